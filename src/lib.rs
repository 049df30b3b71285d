//! wsloop: a single-threaded epoll WebSocket server.
pub mod protocol;
