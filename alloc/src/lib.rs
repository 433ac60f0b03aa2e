//! The allocator riskgate's binaries run with: mimalloc, called the way it
//! is fastest; and [`prefetch`], a hint to the cache. This crate holds all
//! of riskgate's `unsafe` code, so that the library and the binaries can
//! forbid it.
//!
//! Why not `mimalloc::MiMalloc`: that crate sends every allocation through
//! `mi_malloc_aligned`. In mimalloc v3 that call's fast path works only while
//! the size class's current page has a free block; when the page runs out it
//! does not refill it, it over-allocates instead: `size + align - 1` bytes,
//! often a block of the next size class (a 160-byte request in a 192-byte
//! block). The page it passed over stays empty, so the next request of that
//! size takes the slow path again (mimalloc issue #889; mimalloc_rust pull
//! request #170). In the decision bench that was ten allocations a decision
//! (BENCHMARKS.md, session 24).
//!
//! A plain `mi_malloc` block is aligned enough for most layouts, by the rule
//! Rust's own `System` allocator applies to `malloc`: mimalloc aligns every
//! block of 16 bytes or more to 16 (`MI_MAX_ALIGN_SIZE`; smaller blocks are
//! 8 bytes, aligned to 8). Layouts that need more go to the aligned calls.
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]

use core::alloc::{GlobalAlloc, Layout};
use core::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment of every mimalloc block of this size or more
/// (`MI_MAX_ALIGN_SIZE`; see the crate's comment).
const MIN_ALIGN: usize = 16;

/// Whether a plain (unaligned) mimalloc call for `size` bytes gives a block
/// aligned to `align`: the rule of std's `System` allocator for `malloc`,
/// and blocks of 8 bytes are aligned to 8.
#[inline]
fn plain(size: usize, align: usize) -> bool {
    align <= 8 || (align <= MIN_ALIGN && align <= size)
}

/// mimalloc as the global allocator:
/// `#[global_allocator] static ALLOC: riskgate_alloc::MiMalloc = riskgate_alloc::MiMalloc;`
pub struct MiMalloc;

// SAFETY: every pointer comes from mimalloc, aligned as the layout asks
// (plain calls where `plain` says they are aligned enough, mimalloc's aligned
// calls otherwise), and goes back to `mi_free`, which takes either kind.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain C calls; mimalloc returns null when out of memory.
        unsafe {
            if plain(layout.size(), layout.align()) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe {
            if plain(layout.size(), layout.align()) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: the caller passes a block this allocator returned.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller passes a block this allocator returned with
        // `layout`; the new block is aligned as in `alloc`, by its new size
        // (a block shrunk below 16 bytes is only aligned to 8). `mi_realloc`
        // takes blocks from either kind of call, as `mi_free` does.
        unsafe {
            if plain(new_size, layout.align()) {
                mi::mi_realloc(ptr.cast(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
            }
        }
    }
}

/// Tells mimalloc never to give freed memory back to the system. Its
/// default gives back what stays free for a second, which would undo a
/// pretouch (`serve --pretouch`) the moment the requests start (measured:
/// 1 GiB pretouched, 0.16 GiB resident after three seconds of load).
pub fn keep_freed_memory() {
    /// `mi_option_purge_delay` in mimalloc v3's `mimalloc.h` (the 16th
    /// option); libmimalloc-sys declares the function, not this constant.
    const MI_OPTION_PURGE_DELAY: mi::mi_option_t = 15;
    // SAFETY: mi_option_set only stores the value in mimalloc's option
    // table; -1 is the documented "never purge".
    unsafe { mi::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Asks the CPU to start loading the cache line that holds `at`, and goes
/// on without waiting for it. A lookup that is about to miss several lines
/// it can name in advance (a few hash tables' buckets) issues them all
/// first, so their misses overlap instead of following one another.
///
/// A hint and nothing more: it reads nothing the program sees and never
/// faults, whatever `at` points to (a dangling or wild pointer included),
/// which is why it is safe to call. Off x86_64 it does nothing.
#[inline(always)]
pub fn prefetch<T>(at: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is in SSE, part of the x86_64 baseline; it never
    // faults, on any address, and changes no state the program can observe.
    unsafe {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(at.cast())
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// [`prefetch`] for every cache line `items` lies on.
#[inline]
pub fn prefetch_slice<T>(items: &[T]) {
    /// A cache line on the targets this is tuned for (x86_64).
    const LINE: usize = 64;
    let bytes = core::mem::size_of_val(items);
    if bytes == 0 {
        return;
    }
    let start = items.as_ptr().cast::<u8>();
    // From the line the first byte is on to the line the last byte is on.
    let offset = start as usize % LINE;
    let mut line = 0;
    while line < offset + bytes {
        prefetch(start.wrapping_sub(offset).wrapping_add(line));
        line += LINE;
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    fn layouts() -> impl Iterator<Item = Layout> {
        let aligns = (0..=12).map(|k| 1usize << k);
        aligns.flat_map(|align| {
            [1, 7, 8, 16, 24, 40, 100, 1000, 4096, 5000, 70_000, 3 << 20]
                .into_iter()
                .filter_map(move |size| Layout::from_size_align(size, align).ok())
        })
    }

    fn aligned(ptr: *mut u8, layout: Layout) -> bool {
        !ptr.is_null() && (ptr as usize).is_multiple_of(layout.align())
    }

    #[test]
    fn every_layout_gets_a_block_aligned_as_asked_and_realloc_keeps_it_both_ways() {
        for layout in layouts() {
            // SAFETY: a non-zero size; the block is written within its size,
            // grown with the same layout, read within the old size and freed
            // with the new one.
            unsafe {
                let p = MiMalloc.alloc(layout);
                assert!(aligned(p, layout), "{layout:?}: {p:?}");
                for i in 0..layout.size() {
                    p.add(i).write(i as u8);
                }
                let bigger = layout.size() * 3 + 5;
                let q = MiMalloc.realloc(p, layout, bigger);
                let grown = Layout::from_size_align(bigger, layout.align()).unwrap();
                assert!(aligned(q, grown), "{grown:?} after realloc: {q:?}");
                for i in 0..layout.size() {
                    assert_eq!(q.add(i).read(), i as u8, "{layout:?}: byte {i} lost");
                }
                // Shrunk below the alignment's size, then to a third.
                let small = Layout::from_size_align(1, layout.align()).unwrap();
                let r = MiMalloc.realloc(q, grown, 1);
                assert!(aligned(r, small), "{layout:?} shrunk to 1 byte: {r:?}");
                assert_eq!(r.read(), 0);
                MiMalloc.dealloc(r, small);
                let third = (layout.size() / 3).max(1);
                let p = MiMalloc.alloc(layout);
                p.write_bytes(7, layout.size());
                let q = MiMalloc.realloc(p, layout, third);
                let shrunk = Layout::from_size_align(third, layout.align()).unwrap();
                assert!(aligned(q, shrunk), "{shrunk:?} after realloc: {q:?}");
                assert!(
                    (0..third).all(|i| q.add(i).read() == 7),
                    "{layout:?} shrunk"
                );
                MiMalloc.dealloc(q, shrunk);
            }
        }
    }

    #[test]
    fn prefetches_take_any_address_and_change_nothing() {
        let block: Vec<u64> = (0..64).collect();
        let freed = {
            let gone = std::vec![7u8; 4096];
            let at = gone.as_ptr();
            drop(gone);
            at
        };
        let wild = [
            core::ptr::null::<u8>(),
            usize::MAX as *const u8,
            0x10 as *const u8,
            freed,
        ];
        for at in wild {
            super::prefetch(at);
        }
        for at in &block {
            super::prefetch(at);
        }
        super::prefetch_slice(&block);
        super::prefetch_slice(&block[..0]);
        super::prefetch_slice(&[(); 3]);
        assert!(block.iter().copied().eq(0..64));
    }

    #[test]
    fn zeroed_blocks_are_zero_even_from_reused_memory() {
        for layout in layouts().filter(|l| l.size() <= 70_000) {
            // SAFETY: as above; the block is only read within its size.
            unsafe {
                let dirty = MiMalloc.alloc(layout);
                dirty.write_bytes(0xa5, layout.size());
                MiMalloc.dealloc(dirty, layout);
                let p = MiMalloc.alloc_zeroed(layout);
                assert!(aligned(p, layout), "{layout:?}: {p:?}");
                assert!(
                    (0..layout.size()).all(|i| p.add(i).read() == 0),
                    "{layout:?}"
                );
                MiMalloc.dealloc(p, layout);
            }
        }
    }

    /// The reason for this crate: past the first page of a size class,
    /// `mimalloc::MiMalloc` put requests in blocks of a bigger class (160
    /// bytes in 192, 32 in 48), on a slow path every time.
    #[test]
    fn blocks_keep_their_size_class_past_the_first_page() {
        for size in [16, 24, 32, 48, 64, 100, 160, 320, 1000] {
            let layout = Layout::from_size_align(size, 8).unwrap();
            // SAFETY: blocks from `alloc`, measured while held, freed once.
            unsafe {
                let blocks: Vec<*mut u8> = (0..20_000).map(|_| MiMalloc.alloc(layout)).collect();
                for &p in &blocks {
                    assert!(aligned(p, layout));
                    assert_eq!(
                        mi::mi_usable_size(p.cast()),
                        mi::mi_good_size(size),
                        "{size}"
                    );
                }
                for p in blocks {
                    MiMalloc.dealloc(p, layout);
                }
            }
        }
    }
}
