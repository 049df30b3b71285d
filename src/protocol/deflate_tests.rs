use super::*;

const SHARED: Agreement = Agreement {
    server_no_context_takeover: true,
    client_no_context_takeover: true,
    server_max_window_bits: None,
    client_max_window_bits: None,
};

fn with_server_bits(bits: u8) -> Agreement {
    Agreement {
        server_max_window_bits: Some(bits),
        ..SHARED
    }
}

fn neg(lines: &[&str]) -> Result<Option<Agreement>, Malformed> {
    negotiate(lines.iter().map(|l| l.as_bytes()))
}

fn answer(lines: &[&str]) -> Option<String> {
    let a = neg(lines).expect("well-formed")?;
    let mut out = Vec::new();
    a.write_header(&mut out);
    Some(String::from_utf8(out).unwrap())
}

#[test]
fn every_parameter_alone() {
    let cases: &[(&str, Option<Agreement>)] = &[
        ("permessage-deflate", Some(SHARED)),
        (
            "permessage-deflate; server_no_context_takeover",
            Some(SHARED),
        ),
        (
            "permessage-deflate; client_no_context_takeover",
            Some(SHARED),
        ),
        ("permessage-deflate; client_max_window_bits", Some(SHARED)),
        ("permessage-deflate; client_max_window_bits=8", Some(SHARED)),
        (
            "permessage-deflate; client_max_window_bits=15",
            Some(SHARED),
        ),
        (
            "permessage-deflate; server_max_window_bits=9",
            Some(with_server_bits(9)),
        ),
        (
            "permessage-deflate; server_max_window_bits=10",
            Some(with_server_bits(10)),
        ),
        (
            "permessage-deflate; server_max_window_bits=15",
            Some(with_server_bits(15)),
        ),
        // zlib cannot deflate with 8 bits, and the answer may not be larger than the offer.
        ("permessage-deflate; server_max_window_bits=8", None),
        // server_max_window_bits needs a value.
        ("permessage-deflate; server_max_window_bits", None),
    ];
    for (offer, want) in cases {
        assert_eq!(neg(&[offer]), Ok(*want), "{offer}");
    }
}

#[test]
fn combinations_and_case() {
    let all = "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
               server_max_window_bits=12; client_max_window_bits=10";
    assert_eq!(neg(&[all]), Ok(Some(with_server_bits(12))));
    assert_eq!(
        neg(&["PerMessage-Deflate;Client_Max_Window_Bits ;SERVER_MAX_WINDOW_BITS = 11"]),
        Ok(Some(with_server_bits(11)))
    );
    assert_eq!(
        neg(&["permessage-deflate\t;\tclient_max_window_bits"]),
        Ok(Some(SHARED))
    );
}

#[test]
fn invalid_values_decline_the_offer() {
    for bad in [
        "server_max_window_bits=7",
        "server_max_window_bits=16",
        "server_max_window_bits=0",
        "server_max_window_bits=010",
        "server_max_window_bits=09",
        "server_max_window_bits=1",
        "server_max_window_bits=abc",
        "server_max_window_bits=+9",
        "client_max_window_bits=7",
        "client_max_window_bits=16",
        "client_max_window_bits=99",
        "client_max_window_bits=\"7\"",
        "server_no_context_takeover=1",
        "client_no_context_takeover=true",
        "client_no_context_takeover=\"x\"",
        "unknown_param",
        "x=1",
    ] {
        let offer = format!("permessage-deflate; {bad}");
        assert_eq!(neg(&[&offer]), Ok(None), "{offer}");
    }
}

#[test]
fn duplicates_decline_the_offer() {
    for dup in [
        "server_no_context_takeover; server_no_context_takeover",
        "client_no_context_takeover; client_no_context_takeover",
        "server_max_window_bits=10; server_max_window_bits=10",
        "client_max_window_bits; client_max_window_bits=10",
        "client_max_window_bits; CLIENT_MAX_WINDOW_BITS",
    ] {
        let offer = format!("permessage-deflate; {dup}");
        assert_eq!(neg(&[&offer]), Ok(None), "{offer}");
    }
    // Too many parameters to be a permessage-deflate offer at all.
    let many = format!(
        "permessage-deflate{}",
        "; client_max_window_bits".repeat(20)
    );
    assert_eq!(neg(&[&many]), Ok(None));
}

#[test]
fn quoted_values() {
    assert_eq!(
        neg(&["permessage-deflate; server_max_window_bits=\"10\""]),
        Ok(Some(with_server_bits(10)))
    );
    // Escapes inside a quoted string are unescaped before the value is read.
    assert_eq!(
        neg(&["permessage-deflate; server_max_window_bits=\"1\\2\""]),
        Ok(Some(with_server_bits(12)))
    );
    assert_eq!(
        neg(&["permessage-deflate; client_max_window_bits=\"15\""]),
        Ok(Some(SHARED))
    );
    // A comma inside quotes does not split the list; the value is not a token: malformed.
    assert!(neg(&["permessage-deflate; x=\"a,b\""]).is_err());
    // A quoted value that unescapes to a token but is no window size: declined.
    assert_eq!(
        neg(&["permessage-deflate; server_max_window_bits=\"100\""]),
        Ok(None)
    );
}

#[test]
fn several_offers_and_lines_the_first_acceptable_wins() {
    // The first offer is declined (8 bits), the second taken.
    assert_eq!(
        neg(&["permessage-deflate; server_max_window_bits=8, permessage-deflate; server_max_window_bits=10, permessage-deflate"]),
        Ok(Some(with_server_bits(10)))
    );
    // Unknown extensions before it are skipped.
    assert_eq!(
        neg(&["x-webkit-deflate-frame, foo; bar=baz; q=\"quoted\", permessage-deflate"]),
        Ok(Some(SHARED))
    );
    // Offers spread over several header lines, in order.
    assert_eq!(
        neg(&[
            "permessage-deflate; bogus",
            "permessage-deflate; server_max_window_bits=11",
            "permessage-deflate",
        ]),
        Ok(Some(with_server_bits(11)))
    );
    // Empty elements are allowed.
    assert_eq!(neg(&[" , ,permessage-deflate,,"]), Ok(Some(SHARED)));
    // Nothing acceptable.
    assert_eq!(neg(&["foo, bar; baz"]), Ok(None));
    assert_eq!(neg(&[]), Ok(None));
    assert_eq!(neg(&[""]), Ok(None));
    // The name must be exact.
    assert_eq!(neg(&["permessage-deflatex, xpermessage-deflate"]), Ok(None));
}

#[test]
fn malformed_headers_are_errors_wherever_they_are() {
    for bad in [
        "permessage-deflate; ",   // a parameter name missing
        "permessage-deflate;; x", // an empty parameter
        "permessage-deflate x",   // junk after the name
        "; permessage-deflate",   // no name
        "permessage-deflate; a=", // no value
        "permessage-deflate; a=\"unterminated",
        "permessage-deflate; a=\"\"", // an empty quoted value is not a token
        "permessage-deflate; a=\"b c\"", // nor one with a space
        "permessage-deflate; a=b=c",
        "perm\u{e9}ssage-deflate", // not a token
        "permessage-deflate; server_max_window_bits=@",
    ] {
        assert!(neg(&[bad]).is_err(), "{bad:?}");
    }
    // A malformed line fails the handshake even after an acceptable offer.
    assert!(neg(&["permessage-deflate", "foo; ="]).is_err());
}

#[test]
fn answers_name_exactly_the_required_parameters() {
    assert_eq!(
        answer(&["permessage-deflate; client_max_window_bits"]).unwrap(),
        "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; \
         client_no_context_takeover\r\n"
    );
    assert_eq!(
        answer(&["permessage-deflate; server_max_window_bits=9"]).unwrap(),
        "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; \
         client_no_context_takeover; server_max_window_bits=9\r\n"
    );
    assert_eq!(
        answer(&["permessage-deflate; server_max_window_bits=15"]).unwrap(),
        "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; \
         client_no_context_takeover; server_max_window_bits=15\r\n"
    );
    let a = Agreement {
        client_max_window_bits: Some(10),
        ..SHARED
    };
    let mut out = Vec::new();
    a.write_header(&mut out);
    assert!(out.ends_with(b"; client_max_window_bits=10\r\n"));
    assert_eq!(with_server_bits(11).deflate_window_bits(), 11);
    assert_eq!(SHARED.deflate_window_bits(), 15);
}

fn inflate(data: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
    let mut out = Vec::new();
    Inflater::new().inflate(data, &mut out, limit).map(|()| out)
}

/// RFC 7692 section 7.2.3: the example byte sequences.
#[test]
fn rfc_7692_examples_inflate() {
    // 7.2.3.1: "Hello" in a compressed block.
    let hello = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
    assert_eq!(inflate(&hello, 100).unwrap(), b"Hello");
    // 7.2.3.3: a block with no compression (the last byte begins the flush's empty block).
    let stored = [
        0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00,
    ];
    assert_eq!(inflate(&stored, 100).unwrap(), b"Hello");
    // 7.2.3.4: a block with BFINAL set.
    let last = [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00];
    assert_eq!(inflate(&last, 100).unwrap(), b"Hello");
    // 7.2.3.6: an empty message is one 0x00 byte; an empty payload inflates to nothing too.
    assert_eq!(inflate(&[0x00], 100).unwrap(), b"");
    assert_eq!(inflate(&[], 100).unwrap(), b"");
    // The same "Hello" twice in one message (7.2.3.2's bytes for the second message refer
    // to the first, which needs context takeover: that example is for the dedicated profile).
    let mut d = Deflater::new(15);
    let mut twice = Vec::new();
    d.compress(b"HelloHello", &mut twice);
    assert_eq!(inflate(&twice, 100).unwrap(), b"HelloHello");
}

/// A stream cut short, or followed by more than a flush's zero byte after its final block, is
/// invalid (close 1007), not delivered as whatever inflated from it.
#[test]
fn a_stream_cut_short_or_with_bytes_after_its_final_block_is_invalid() {
    let invalid = |bytes: &[u8]| inflate(bytes, 10_000) == Err(InflateError::Invalid);
    // The stored example without the flush's byte: the tail is taken as the next header.
    assert!(invalid(&[
        0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f
    ]));
    // A stored block claiming 100 bytes that carries 5.
    assert!(invalid(&[
        0x00, 0x64, 0x00, 0x9b, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f
    ]));
    // "Hello" in fixed codes without its end-of-block code, final or not.
    assert!(invalid(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9]));
    assert!(invalid(&[0xf3, 0x48, 0xcd, 0xc9, 0xc9]));
    // A whole message cut anywhere inside its data.
    let mut whole = Vec::new();
    let text: Vec<u8> = (0..4000u32)
        .map(|i| b"abcdefgh"[(i * i % 7) as usize])
        .collect();
    Deflater::new(15).compress(&text, &mut whole);
    assert_eq!(inflate(&whole, 10_000).unwrap(), text);
    for cut in 1..whole.len() {
        assert!(invalid(&whole[..cut]), "cut at {cut} of {}", whole.len());
    }
    // After a final block: the flush's one zero byte is fine (7.2.3.4), more is not.
    let last = [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
    assert_eq!(inflate(&last, 100).unwrap(), b"Hello");
    for extra in [
        &[0x00, 0x00][..],
        &[0x01],
        &[0x00, 0x00, 0xff, 0xff],
        b"trailing",
    ] {
        let mut m = last.to_vec();
        m.extend_from_slice(extra);
        assert!(invalid(&m), "{extra:?} after the final block");
    }
}

#[test]
fn deflate_produces_the_rfc_bytes_and_strips_the_tail() {
    let mut d = Deflater::new(15);
    let mut out = Vec::new();
    d.compress(b"Hello", &mut out);
    assert_eq!(out, [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]);
    // Reset per message: the second message is compressed alone, the same bytes again.
    out.clear();
    d.compress(b"Hello", &mut out);
    assert_eq!(out, [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]);
    out.clear();
    d.compress(b"", &mut out);
    assert_eq!(out, [0x00]);
    // Appends after what `out` holds.
    let mut out = b"xy".to_vec();
    d.compress(b"Hello", &mut out);
    assert_eq!(&out[..2], b"xy");
    assert_eq!(inflate(&out[2..], 10).unwrap(), b"Hello");
}

#[test]
fn round_trips_with_every_window() {
    let json: Vec<u8> = (0..2000)
        .flat_map(|i| {
            format!("{{\"id\":{i},\"name\":\"user{}\",\"ok\":true}},", i % 7).into_bytes()
        })
        .collect();
    let noise: Vec<u8> = (0u32..100_000)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for bits in 9..=15 {
        let mut d = Deflater::new(bits);
        for data in [&json[..], &noise[..], b"a", b""] {
            let mut c = Vec::new();
            d.compress(data, &mut c);
            assert_eq!(inflate(&c, data.len()).unwrap(), data, "{bits} bits");
            if data.len() > 1000 && data == &json[..] {
                assert!(c.len() < data.len() / 4, "{} -> {}", data.len(), c.len());
            }
        }
    }
}

/// A zip bomb: 15 MB of zeros compress to about 15 KB. Inflating it with a limit stops at the
/// limit, and the output buffer never grows beyond the limit plus one byte.
#[test]
fn a_zip_bomb_stops_at_the_limit_and_allocates_no_more() {
    let zeros = vec![0u8; 15 << 20];
    let mut bomb = Vec::new();
    Deflater::new(15).compress(&zeros, &mut bomb);
    assert!(bomb.len() < 20 << 10, "bomb is {} bytes", bomb.len());
    for limit in [0, 1, 100, 16 << 10, 16 << 10 | 1, 1 << 20] {
        let mut out = Vec::new();
        let r = Inflater::new().inflate(&bomb, &mut out, limit);
        assert_eq!(r, Err(InflateError::TooBig), "limit {limit}");
        assert!(
            out.len() <= limit + 1,
            "limit {limit}: inflated {}",
            out.len()
        );
        assert!(
            out.capacity() <= limit + 1,
            "limit {limit}: capacity {}",
            out.capacity()
        );
    }
    // At exactly its size it fits.
    let mut out = Vec::new();
    let mut small = Vec::new();
    Deflater::new(15).compress(&zeros[..100_000], &mut small);
    assert_eq!(Inflater::new().inflate(&small, &mut out, 100_000), Ok(()));
    assert_eq!(out.len(), 100_000);
    assert!(out.capacity() <= 100_001);
    out.clear();
    assert_eq!(
        Inflater::new().inflate(&small, &mut out, 99_999),
        Err(InflateError::TooBig)
    );
}

#[test]
fn invalid_data_is_an_error_and_the_inflater_recovers() {
    let mut inf = Inflater::new();
    let mut out = Vec::new();
    // BTYPE 11 is reserved.
    assert_eq!(
        inf.inflate(&[0xff, 0xff], &mut out, 100),
        Err(InflateError::Invalid)
    );
    // A stored block whose length does not match its complement.
    assert_eq!(
        inf.inflate(&[0x00, 0x05, 0x00, 0x00, 0x00, b'x'], &mut out, 100),
        Err(InflateError::Invalid)
    );
    // The same inflater is usable for the next message.
    out.clear();
    inf.inflate(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], &mut out, 100)
        .unwrap();
    assert_eq!(out, b"Hello");
    // A distance beyond what was produced.
    out.clear();
    let far = [0x63, 0x00, 0x02, 0x00, 0x00]; // a literal, then garbage codes
    let _ = inf.inflate(&far, &mut out, 100); // whatever it is, no panic
}
