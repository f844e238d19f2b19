//! A process that switches to the system allocator midway gives every block back to the
//! allocator that made it: blocks from before the switch are freed, grown and shrunk across it.
//! (Its own test binary: the switch is for the whole process and cannot be undone.)

#[global_allocator]
static ALLOCATOR: allocator::SizeSplit = allocator::SizeSplit;

#[test]
fn blocks_made_before_the_switch_are_freed_and_resized_after_it() {
    // Small (mimalloc) and large (system) blocks, with contents to check after each move.
    let mut before: Vec<Vec<u8>> = (0..2_000)
        .map(|index| vec![(index % 251) as u8; 16 + (index * 37) % 4_000])
        .collect();
    let large_before = vec![7u8; allocator::LARGE_BLOCK * 2];
    let threads: Vec<std::thread::JoinHandle<Vec<String>>> = (0..4)
        .map(|thread| {
            std::thread::spawn(move || {
                (0..5_000)
                    .map(|index| format!("{thread}-{index}"))
                    .collect()
            })
        })
        .collect();
    allocator::system_only();
    // Blocks from before: grown past the large-block line, shrunk, freed, on other threads too.
    for (index, block) in before.iter_mut().enumerate() {
        let fill = (index % 251) as u8;
        assert!(block.iter().all(|byte| *byte == fill));
        if index % 3 == 0 {
            block.resize(allocator::LARGE_BLOCK + 1, fill);
        } else if index % 3 == 1 {
            block.truncate(8);
            block.shrink_to_fit();
        }
        assert!(block.iter().all(|byte| *byte == fill));
    }
    let strings: Vec<Vec<String>> = threads
        .into_iter()
        .map(|thread| thread.join().unwrap())
        .collect();
    let moved = std::thread::spawn(move || {
        let count: usize = strings.iter().map(Vec::len).sum();
        drop(strings);
        count
    })
    .join()
    .unwrap();
    assert_eq!(moved, 20_000);
    assert!(large_before.iter().all(|byte| *byte == 7));
    drop(large_before);
    drop(before);
    // New blocks after the switch, small and large, grown across the line and freed.
    let mut after: Vec<Vec<u64>> = (0..2_000)
        .map(|index| vec![index; 1 + index as usize % 64])
        .collect();
    for block in after.iter_mut().step_by(7) {
        let value = block[0];
        block.resize(allocator::LARGE_BLOCK, value);
        assert!(block.iter().all(|item| *item == value));
    }
    drop(after);
}
