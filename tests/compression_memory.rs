//! What permessage-deflate's compressors and decompressors hold on the heap, measured with a
//! counting allocator for every window size and memory level, against the figures the memory
//! budget counts ([`Deflater::heap_bytes_with`], [`Inflater::HEAP_BYTES`]): each figure at
//! least what is measured, and at most 8 KiB above it. Run with `--nocapture` for the table.
//! (One test: the counting allocator sees every thread's allocations.)
// Test code (see Cargo.toml's [lints]): it fails by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use std::alloc::System;
use wsloop::protocol::deflate::{Deflater, Inflater};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Heap bytes `make` leaves held (what it returns kept alive while measuring).
fn held_by<T>(make: impl FnOnce() -> T) -> (T, usize) {
    let region = Region::new(GLOBAL);
    let t = make();
    let c = region.change();
    // A realloc's growth (or shrinking) is in bytes_allocated (bytes_deallocated) already.
    let held = c.bytes_allocated as isize - c.bytes_deallocated as isize;
    (t, held as usize)
}

fn text(n: usize) -> Vec<u8> {
    let mut x = 7u64;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            b"abcdefghijklmnopqrstuvwxyz {}:,\"0123456789"[(x >> 58) as usize % 42]
        })
        .collect()
}

#[test]
fn compression_state_is_counted_as_the_budget_counts_it() {
    let msg = text(64 * 1024);
    let mut out = Vec::with_capacity(2 * msg.len());
    for bits in 9..=15u8 {
        let mut row = Vec::new();
        for mem in 1..=9u8 {
            // After compressing a message (anything allocated lazily is then held).
            let (d, held) = held_by(|| {
                let mut d = Deflater::with(bits, mem, true);
                d.compress(&msg, &mut out);
                out.clear();
                d.compress(&msg, &mut out);
                d
            });
            let counted = Deflater::heap_bytes_with(bits, mem);
            assert!(
                counted >= held && counted - held <= 8 * 1024,
                "deflate {bits} bits, memory level {mem}: {held} held, {counted} counted"
            );
            row.push(held);
            drop(d);
        }
        let z = {
            let mut z = Vec::new();
            Deflater::with(bits, 8, false).compress(&msg, &mut z);
            z
        };
        let (i, held) = held_by(|| {
            let mut i = Inflater::with_window(bits, true);
            let mut o = Vec::with_capacity(msg.len() + 1);
            i.inflate(&z, &mut o, msg.len()).unwrap();
            assert_eq!(o, msg);
            i
        });
        let counted = Inflater::HEAP_BYTES;
        assert!(
            counted >= held && counted - held <= 8 * 1024,
            "inflate {bits} bits: {held} held, {counted} counted"
        );
        drop(i);
        println!("{bits} bits: deflate by memory level 1..9 {row:?}; inflate {held}");
    }
}
