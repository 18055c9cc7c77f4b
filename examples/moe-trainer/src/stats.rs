//! TEMPORARY stub (replaced from branch moe-aux).
pub type DomainExpertCounts = Vec<Vec<u64>>;
pub fn frequencies(counts: &DomainExpertCounts) -> Vec<Vec<f64>> {
    counts
        .iter()
        .map(|r| {
            let t: u64 = r.iter().sum();
            r.iter()
                .map(|&c| if t == 0 { 0.0 } else { c as f64 / t as f64 })
                .collect()
        })
        .collect()
}
pub fn mutual_information(_counts: &DomainExpertCounts) -> f64 {
    0.0
}
pub fn max_frequency(counts: &DomainExpertCounts) -> Vec<f64> {
    frequencies(counts)
        .iter()
        .map(|r| r.iter().cloned().fold(0.0, f64::max))
        .collect()
}
pub fn specialization_table(title: &str, _d: &[&str], counts: &DomainExpertCounts) -> String {
    format!("{title}\n{counts:?}\n")
}
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v.get(v.len() / 2).copied()
}
