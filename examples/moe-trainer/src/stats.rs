//! Expert specialization statistics of a mixture-of-experts layer: per-domain expert selection
//! frequencies, the mutual information between domain and chosen expert, a plain-text table of
//! both, and a median helper for summarizing runs.
//!
//! Counts are `counts[domain][expert]`. Rows are expected to have equal length; a shorter row is
//! treated as if padded with zeros.

/// Token-slot selection counts of one MoE layer: `counts[domain][expert]`.
pub type DomainExpertCounts = Vec<Vec<u64>>;

/// Number of experts (the longest row).
fn num_experts(counts: &DomainExpertCounts) -> usize {
    counts.iter().map(Vec::len).max().unwrap_or(0)
}

/// Per-domain selection frequency of each expert (each row sums to 1; an all-zero row stays
/// zeros). Rows are padded to the longest row.
pub fn frequencies(counts: &DomainExpertCounts) -> Vec<Vec<f64>> {
    let experts = num_experts(counts);
    counts
        .iter()
        .map(|row| {
            let total: u64 = row.iter().sum();
            (0..experts)
                .map(|e| match (row.get(e), total) {
                    (Some(&c), t) if t > 0 => c as f64 / t as f64,
                    _ => 0.0,
                })
                .collect()
        })
        .collect()
}

/// Mutual information I(domain; chosen expert) in bits from the joint counts: 0 for empty or
/// independent counts, at most log2(min(D, E)).
pub fn mutual_information(counts: &DomainExpertCounts) -> f64 {
    let experts = num_experts(counts);
    let total: u64 = counts.iter().flatten().sum();
    if total == 0 {
        return 0.0;
    }
    let n = total as f64;
    let domain_totals: Vec<f64> = counts
        .iter()
        .map(|r| r.iter().sum::<u64>() as f64)
        .collect();
    let expert_totals: Vec<f64> = (0..experts)
        .map(|e| counts.iter().filter_map(|r| r.get(e)).sum::<u64>() as f64)
        .collect();
    let mut mi = 0.0;
    for (row, &nd) in counts.iter().zip(&domain_totals) {
        for (&c, &ne) in row.iter().zip(&expert_totals) {
            if c > 0 {
                let c = c as f64;
                // p(d,e) log2(p(d,e) / (p(d) p(e))) with counts: c/n * log2(c n / (nd ne))
                mi += c / n * (c * n / (nd * ne)).log2();
            }
        }
    }
    // rounding can leave a tiny negative value for independent counts
    mi.max(0.0)
}

/// The largest expert frequency of each domain (0 for an all-zero row).
pub fn max_frequency(counts: &DomainExpertCounts) -> Vec<f64> {
    frequencies(counts)
        .iter()
        .map(|row| row.iter().copied().fold(0.0, f64::max))
        .collect()
}

/// A plain-text fixed-width table of frequencies: `title` on the first line, a header, one row
/// per domain (one column per expert, then the row's max frequency), then the mutual
/// information. Domains without a name in `domain_names` are called `d<index>`.
pub fn specialization_table(
    title: &str,
    domain_names: &[&str],
    counts: &DomainExpertCounts,
) -> String {
    let freqs = frequencies(counts);
    let experts = num_experts(counts);
    let names: Vec<String> = (0..counts.len())
        .map(|d| {
            domain_names
                .get(d)
                .map_or_else(|| format!("d{d}"), |s| (*s).to_string())
        })
        .collect();
    let name_w = names.iter().map(String::len).max().unwrap_or(0).max(6);
    let mut out = String::new();
    out.push_str(title);
    out.push('\n');
    out.push_str(&format!("{:<name_w$}", "domain"));
    for e in 0..experts {
        out.push_str(&format!(" {:>6}", format!("e{e}")));
    }
    out.push_str(&format!(" {:>6}\n", "max"));
    for (name, row) in names.iter().zip(&freqs) {
        out.push_str(&format!("{name:<name_w$}"));
        for f in row {
            out.push_str(&format!(" {f:>6.3}"));
        }
        let max = row.iter().copied().fold(0.0, f64::max);
        out.push_str(&format!(" {max:>6.3}\n"));
    }
    let bound = (counts.len().min(experts).max(1) as f64).log2();
    out.push_str(&format!(
        "MI(domain; expert) = {:.4} bits (max {bound:.4})\n",
        mutual_information(counts)
    ));
    out
}

/// Median of a slice (None when empty; the mean of the two middle values for an even length).
/// NaN-free input assumed.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn frequencies_normalize_rows() {
        let f = frequencies(&vec![vec![1, 3], vec![0, 0], vec![5]]);
        assert_eq!(f, vec![vec![0.25, 0.75], vec![0.0, 0.0], vec![1.0, 0.0]]);
        assert!(frequencies(&vec![]).is_empty());
    }

    #[test]
    fn mutual_information_of_specialized_counts_is_log2_of_the_domains() {
        let c = vec![vec![100, 0, 0], vec![0, 7, 0], vec![0, 0, 42]];
        // p(d) differ but the expert determines the domain: MI = H(domain)
        let n = 149.0f64;
        let h: f64 = [100.0f64, 7.0, 42.0]
            .iter()
            .map(|&x| -(x / n) * (x / n).log2())
            .sum();
        assert!(close(mutual_information(&c), h));
        let equal = vec![vec![5, 0, 0], vec![0, 5, 0], vec![0, 0, 5]];
        assert!(close(mutual_information(&equal), 3f64.log2()));
        // a permutation is just as specialized
        let perm = vec![vec![0, 0, 9], vec![9, 0, 0], vec![0, 9, 0]];
        assert!(close(mutual_information(&perm), 3f64.log2()));
    }

    #[test]
    fn mutual_information_of_independent_or_empty_counts_is_zero() {
        assert_eq!(mutual_information(&vec![vec![4, 4, 4]; 3]), 0.0);
        // independent but not uniform: rows proportional
        assert!(mutual_information(&vec![vec![1, 2, 3], vec![2, 4, 6]]) < 1e-12);
        assert_eq!(mutual_information(&vec![]), 0.0);
        assert_eq!(mutual_information(&vec![vec![0, 0], vec![0, 0]]), 0.0);
    }

    #[test]
    fn mutual_information_two_by_two_by_hand() {
        // joint p = [[3/8, 1/8], [1/8, 3/8]], marginals 1/2 each:
        // MI = 2 * 3/8 log2(3/2) + 2 * 1/8 log2(1/2) = 3/4 log2 3 - 1
        let c = vec![vec![3, 1], vec![1, 3]];
        assert!(close(mutual_information(&c), 0.75 * 3f64.log2() - 1.0));
        // one deterministic domain: p = [[1/2, 0], [1/4, 1/4]], p(e) = [3/4, 1/4]
        // MI = 1/2 log2(4/3) + 1/4 log2(2/3) + 1/4 log2(2) = 1.5 - 0.75 log2 3
        let c = vec![vec![2, 0], vec![1, 1]];
        assert!(close(mutual_information(&c), 1.5 - 0.75 * 3f64.log2()));
    }

    #[test]
    fn mutual_information_is_bounded_by_the_smaller_side() {
        // 2 domains, 4 experts, fully specialized: log2(2) = 1
        let c = vec![vec![5, 5, 0, 0], vec![0, 0, 5, 5]];
        assert!(close(mutual_information(&c), 1.0));
    }

    #[test]
    fn max_frequency_per_domain() {
        let c = vec![vec![1, 3], vec![0, 0], vec![2, 2]];
        assert_eq!(max_frequency(&c), vec![0.75, 0.0, 0.5]);
    }

    #[test]
    fn table_lists_frequencies_and_mi() {
        let c = vec![vec![3, 1], vec![1, 3], vec![0, 0]];
        let t = specialization_table("layer 0 (step 100)", &["arith", "code"], &c);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 6, "{t}");
        assert_eq!(lines[0], "layer 0 (step 100)");
        assert_eq!(lines[1], "domain     e0     e1    max");
        assert_eq!(lines[2], "arith   0.750  0.250  0.750");
        assert_eq!(lines[3], "code    0.250  0.750  0.750");
        assert_eq!(lines[4], "d2      0.000  0.000  0.000");
        assert!(lines[5].starts_with("MI(domain; expert) = 0.1887 bits (max 1.0000)"));
        // fixed width
        assert!(lines[1..5].iter().all(|l| l.len() == lines[1].len()));
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }
}
