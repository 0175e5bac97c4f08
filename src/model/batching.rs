//! Batches grouped by length. A left-padded batch costs its longest row times its size, so one
//! long prompt (self-instruct-seed has one of ~1,000 words) among short ones multiplies the cost
//! of its whole batch; sorted, a long prompt pads only its neighbours in length. A token budget
//! also keeps a batch of long prompts from materialising rows × heads × length² attention
//! scores that do not fit in memory.

use anyhow::Result;

/// Padded positions (rows × (longest prompt + new tokens)) a batch may hold; one row alone may
/// exceed it. 16,384 keeps full batches of 100 short prompts with 100 new tokens.
pub const MAX_BATCH_TOKENS: usize = 16_384;

/// Indices into `lens`, longest first, in batches of at most `max_rows` rows and at most
/// `MAX_BATCH_TOKENS` padded positions, counting `extra` positions per row for new tokens. A row
/// less than half as long as its batch's first starts a new batch, so padding never exceeds
/// half of a batch (without this, a 1,400-token prompt padded the ten next-longest, ~300 tokens
/// each, to its length). Equal lengths keep their order, so the batches are a function of the
/// lengths alone.
pub fn by_length(lens: &[usize], extra: usize, max_rows: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    for i in order {
        // Longest first: the batch's first row sets its padded length.
        let width = cur.first().map_or(lens[i], |&f| lens[f]) + extra;
        if !cur.is_empty()
            && (cur.len() >= max_rows.max(1)
                || (cur.len() + 1) * width > MAX_BATCH_TOKENS
                || 2 * (lens[i] + extra) < width)
        {
            batches.push(std::mem::take(&mut cur));
        }
        cur.push(i);
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    batches
}

/// `f` applied to `seqs` in length-grouped batches (see `by_length`); its per-row results come
/// back in the order of `seqs`. `f` must return one result per row it is given.
pub fn map_by_length<T>(
    seqs: &[Vec<u32>],
    extra: usize,
    max_rows: usize,
    mut f: impl FnMut(&[Vec<u32>]) -> Result<Vec<T>>,
) -> Result<Vec<T>> {
    let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
    let mut out: Vec<Option<T>> = (0..seqs.len()).map(|_| None).collect();
    for idx in by_length(&lens, extra, max_rows) {
        let chunk: Vec<Vec<u32>> = idx.iter().map(|&i| seqs[i].clone()).collect();
        let res = f(&chunk)?;
        anyhow::ensure!(
            res.len() == idx.len(),
            "a batch of {} rows gave {} results",
            idx.len(),
            res.len()
        );
        for (i, r) in idx.into_iter().zip(res) {
            out[i] = Some(r);
        }
    }
    Ok(out
        .into_iter()
        .map(|r| r.expect("every row is in one batch"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_every_row_once_longest_first_within_limits() {
        let lens = [5, 300, 7, 7, 1, 9000, 40, 7];
        let b = by_length(&lens, 100, 3);
        let mut seen: Vec<usize> = b.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lens.len()).collect::<Vec<_>>());
        assert_eq!(b[0], vec![5], "9,100 positions x 2 rows exceed the budget");
        assert_eq!(b[1], vec![1], "140 is less than half of 400: a new batch");
        assert_eq!(
            b[2],
            vec![6, 2, 3],
            "then by length, equal lengths in order"
        );
        assert_eq!(b[3], vec![7, 0, 4]);
        // Without new tokens the lengths alone count: 40 and 7 do not share a batch.
        let b0 = by_length(&lens, 0, 8);
        assert_eq!(
            b0,
            vec![vec![5], vec![1], vec![6], vec![2, 3, 7, 0], vec![4]]
        );
        for batch in &b {
            assert!(batch.len() <= 3);
            let w = lens[batch[0]] + 100;
            assert!(batch.len() == 1 || batch.len() * w <= MAX_BATCH_TOKENS);
        }
    }

    #[test]
    fn results_come_back_in_input_order() {
        let seqs: Vec<Vec<u32>> = [3usize, 1, 4, 1, 5, 9, 2, 6]
            .iter()
            .map(|&n| (0..n as u32).collect())
            .collect();
        let lens = map_by_length(&seqs, 0, 3, |chunk| {
            Ok(chunk.iter().map(|s| s.len()).collect())
        })
        .unwrap();
        assert_eq!(lens, vec![3, 1, 4, 1, 5, 9, 2, 6]);
        assert!(map_by_length(&seqs, 0, 3, |_| Ok(vec![0usize])).is_err());
    }
}
