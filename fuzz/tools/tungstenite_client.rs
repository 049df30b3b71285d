//! Connects to ws://127.0.0.1:PORT/<path> with tungstenite's client, offering subprotocols, so
//! that `capture_handshakes.py` can record the request it sends. Built by that script in a
//! throwaway crate that depends on `tungstenite = "0.30"` (the main crate's dev-dependency).
use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;

fn main() {
    let url = std::env::args().nth(1).expect("url");
    let mut req = url.into_client_request().unwrap();
    if let Some(protocols) = std::env::args().nth(2) {
        let value = HeaderValue::from_str(&protocols).unwrap();
        req.headers_mut().insert("Sec-WebSocket-Protocol", value);
    }
    // The capture server closes after reading the head: the handshake fails, as expected.
    let _ = tungstenite::connect(req);
}
