//! Turns nested CIDR prefixes into disjoint intervals where the most
//! specific prefix wins, so a lookup is one binary search.

/// One prefix as an inclusive range of addresses, with its verdict class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Range {
    pub start: u128,
    pub end: u128,
    pub class: u16,
}

/// `prefixes` must be sorted by start, then by length ascending (the wider
/// first), without duplicates. CIDR prefixes either nest or are disjoint,
/// which is what makes a stack enough. Adjacent pieces with the same class
/// are merged.
pub(crate) fn flatten(prefixes: &[Range]) -> Vec<Range> {
    let mut out: Vec<Range> = Vec::with_capacity(prefixes.len());
    let mut emit = |start: u128, end: u128, class: u16| {
        if let Some(last) = out.last_mut()
            && last.class == class
            && last.end.checked_add(1) == Some(start)
        {
            last.end = end;
        } else {
            out.push(Range { start, end, class });
        }
    };
    let mut stack: Vec<Range> = Vec::new();
    // The first address not yet emitted; None once u128::MAX was emitted.
    let mut cursor: Option<u128> = Some(0);
    for p in prefixes {
        while let Some(top) = stack.last().copied()
            && top.end < p.start
        {
            if let Some(c) = cursor
                && c <= top.end
            {
                emit(c, top.end, top.class);
            }
            cursor = top.end.checked_add(1);
            stack.pop();
        }
        if let Some(top) = stack.last()
            && let Some(c) = cursor
            && c < p.start
        {
            emit(c, p.start - 1, top.class);
        }
        cursor = Some(p.start);
        stack.push(*p);
    }
    while let Some(top) = stack.pop() {
        if let Some(c) = cursor
            && c <= top.end
        {
            emit(c, top.end, top.class);
            cursor = top.end.checked_add(1);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn prefix(addr: u8, len: u8, class: u16) -> Range {
        // 8-bit address space: enough to hit every nesting shape.
        let size = 1u128 << (8 - len);
        let start = u128::from(addr) & !(size - 1);
        Range {
            start,
            end: start + size - 1,
            class,
        }
    }

    fn sorted(mut v: Vec<Range>) -> Vec<Range> {
        v.sort_by_key(|r| (r.start, std::cmp::Reverse(r.end)));
        v.dedup_by_key(|r| (r.start, r.end));
        v
    }

    fn naive(prefixes: &[Range], x: u128) -> Option<u16> {
        prefixes
            .iter()
            .filter(|r| r.start <= x && x <= r.end)
            .min_by_key(|r| r.end - r.start)
            .map(|r| r.class)
    }

    fn find(flat: &[Range], x: u128) -> Option<u16> {
        let i = flat.partition_point(|r| r.start <= x);
        let r = flat.get(i.checked_sub(1)?)?;
        (x <= r.end).then_some(r.class)
    }

    #[test]
    fn nested_prefixes_leave_the_outer_around_the_inner() {
        let p = sorted(vec![prefix(0, 0, 1), prefix(64, 2, 2), prefix(80, 4, 3)]);
        let flat = flatten(&p);
        assert_eq!(
            flat.iter().map(|r| (r.start, r.end, r.class)).collect::<Vec<_>>(),
            vec![(0, 63, 1), (64, 79, 2), (80, 95, 3), (96, 127, 2), (128, 255, 1)]
        );
    }

    #[test]
    fn the_whole_space_ends_cleanly() {
        let whole = Range {
            start: 0,
            end: u128::MAX,
            class: 7,
        };
        let inner = Range {
            start: u128::MAX - 1,
            end: u128::MAX,
            class: 8,
        };
        let flat = flatten(&[whole, inner]);
        assert_eq!(flat.len(), 2);
        assert_eq!(find(&flat, u128::MAX), Some(8));
        assert_eq!(find(&flat, 5), Some(7));
    }

    proptest! {
        #[test]
        fn flattening_agrees_with_longest_match(
            raw in proptest::collection::vec((any::<u8>(), 0u8..=8, 0u16..4), 0..24)
        ) {
            let p = sorted(raw.iter().map(|&(a, l, c)| prefix(a, l, c)).collect());
            let flat = flatten(&p);
            for w in flat.windows(2) {
                prop_assert!(w[0].end < w[1].start);
            }
            for x in 0..=255u128 {
                prop_assert_eq!(find(&flat, x), naive(&p, x));
            }
        }
    }
}
