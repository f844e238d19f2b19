//! The process's allocator, by measurement (docs/benchmarks.md, issues 21 and 23): mimalloc for
//! blocks under [`LARGE_BLOCK`], glibc malloc for larger ones, and glibc for everything in a
//! process that calls [`system_only`] (a reader).
//!
//! - A writer: under command load glibc spent about a third of the writer's CPU in malloc, free
//!   and `malloc_consolidate`; mimalloc halves the writer's CPU per command. Large blocks
//!   (growing buffers, which glibc moves with `mremap` without copying) stay on glibc.
//! - A reader: its catch-up allocates on the NATS connection's thread and frees on the thread
//!   that applies the batch; with mimalloc for small blocks about a quarter of its CPU went to
//!   the kernel zeroing fresh pages (`clear_page_erms` under mimalloc's fresh-page path), and
//!   a deposit catch-up ran at 21 000-24 700 events/s against 26 900-29 000 with glibc alone.
//!
//! The one crate allowed `unsafe`: implementing `GlobalAlloc` is unsafe by definition. It only
//! forwards to the two allocators and copies bytes between them.

use std::sync::atomic::{AtomicBool, Ordering};

/// Blocks of this size and larger go to the system allocator.
pub const LARGE_BLOCK: usize = 256 * 1024;

/// Whether new small blocks come from mimalloc: until [`system_only`].
static SMALL_TO_MIMALLOC: AtomicBool = AtomicBool::new(true);

/// From now on every new block comes from the system allocator; blocks mimalloc made before
/// are still given back to it. For a process measured faster on glibc alone (a reader). Call it
/// early (the fewer blocks made before, the fewer frees need asking which allocator made them).
pub fn system_only() {
    SMALL_TO_MIMALLOC.store(false, Ordering::Relaxed);
}

/// Small blocks to mimalloc, large ones to the system allocator (everything to the system
/// allocator after [`system_only`]). A block's size and, after the switch, mimalloc's own
/// record of its memory decide who made it, so a block always returns to its allocator.
pub struct SizeSplit;

/// Whether a new block of `size` bytes comes from mimalloc.
fn new_from_mimalloc(size: usize) -> bool {
    size < LARGE_BLOCK && SMALL_TO_MIMALLOC.load(Ordering::Relaxed)
}

/// Whether mimalloc made the block at `pointer` of `size` bytes.
fn made_by_mimalloc(pointer: *mut u8, size: usize) -> bool {
    size < LARGE_BLOCK
        && (SMALL_TO_MIMALLOC.load(Ordering::Relaxed)
            // SAFETY: only reads mimalloc's map of the memory it manages.
            || unsafe { libmimalloc_sys::mi_is_in_heap_region(pointer.cast()) })
}

unsafe impl std::alloc::GlobalAlloc for SizeSplit {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if new_from_mimalloc(layout.size()) {
            unsafe { mimalloc::MiMalloc.alloc(layout) }
        } else {
            unsafe { std::alloc::System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if new_from_mimalloc(layout.size()) {
            unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
        } else {
            unsafe { std::alloc::System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: std::alloc::Layout) {
        if made_by_mimalloc(pointer, layout.size()) {
            unsafe { mimalloc::MiMalloc.dealloc(pointer, layout) }
        } else {
            unsafe { std::alloc::System.dealloc(pointer, layout) }
        }
    }

    unsafe fn realloc(
        &self,
        pointer: *mut u8,
        layout: std::alloc::Layout,
        new_size: usize,
    ) -> *mut u8 {
        let (was_mimalloc, is_mimalloc) = (
            made_by_mimalloc(pointer, layout.size()),
            new_from_mimalloc(new_size),
        );
        if !was_mimalloc && !is_mimalloc {
            return unsafe { std::alloc::System.realloc(pointer, layout, new_size) };
        }
        if was_mimalloc && is_mimalloc {
            return unsafe { mimalloc::MiMalloc.realloc(pointer, layout, new_size) };
        }
        // From one allocator to the other: a new block, the bytes, the old one freed.
        let Ok(new_layout) = std::alloc::Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        let moved = unsafe { self.alloc(new_layout) };
        if !moved.is_null() {
            unsafe {
                std::ptr::copy_nonoverlapping(pointer, moved, layout.size().min(new_size));
                self.dealloc(pointer, layout);
            }
        }
        moved
    }
}
