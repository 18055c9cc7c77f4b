//! Result rows, the nccl-tests style table and the summary line.

use super::human_bytes;

/// Median of a sample (NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// One size of one configuration, combined over the peers that reported it.
#[derive(Debug, Clone)]
pub struct Row {
    pub world: u32,
    pub pool: u32,
    pub conc: u32,
    /// Bytes of one all-reduce (source dtype).
    pub bytes: u64,
    pub count: u64,
    /// `f32`, or `f32>u8` for quantized ops.
    pub dtype: String,
    pub op: String,
    /// Time of each timed iteration in µs (max over peers when combined).
    pub times_us: Vec<f64>,
    /// Bytes one peer wrote / read per iteration (all `conc` ops, headers included).
    pub tx: u64,
    pub rx: u64,
    /// Wrong elements over all verified iterations and peers.
    pub wrong: u64,
    /// Verified iterations (per peer).
    pub checked: u32,
    /// Largest absolute error (quantized) seen by any peer.
    pub max_err: Option<f64>,
    /// Peers whose result hash differed from the first peer's (bit-parity).
    pub parity_errors: u32,
    /// CPU time (all threads) of one peer process per iteration, µs (mean over peers).
    pub cpu_us: f64,
    /// The collective measured (its bus-bandwidth factor).
    pub coll: super::Collective,
}

impl Row {
    pub fn median_us(&self) -> f64 {
        median(&self.times_us)
    }
    pub fn min_us(&self) -> f64 {
        self.times_us.iter().copied().fold(f64::NAN, f64::min)
    }
    /// `conc · bytes / median time`, GB/s.
    pub fn algbw(&self) -> f64 {
        (self.conc as u64 * self.bytes) as f64 / (self.median_us() * 1e-6) / 1e9
    }
    /// `algbw ·` the collective's factor (all-reduce `2(N−1)/N`, broadcast
    /// 1, all-gather and reduce-scatter `(N−1)/N`), GB/s.
    pub fn busbw(&self) -> f64 {
        self.algbw() * self.coll.bus_factor(self.world)
    }
    /// Bytes this peer wrote per second, GB/s.
    pub fn wirebw(&self) -> f64 {
        self.tx as f64 / (self.median_us() * 1e-6) / 1e9
    }
    pub fn errors(&self) -> u64 {
        self.wrong + self.parity_errors as u64
    }
    /// Bytes one peer sends per iteration by the ring algorithm, `conc ·
    /// factor · bytes` (all-reduce: `2(N−1)/N`).
    pub fn algo_bytes_sent(&self) -> f64 {
        self.conc as f64 * self.bytes as f64 * self.coll.bus_factor(self.world)
    }
    /// CPU nanoseconds a peer spends per byte it sends (load-independent cost).
    pub fn cpu_ns_per_byte(&self) -> f64 {
        self.cpu_us * 1e3 / self.algo_bytes_sent()
    }
}

/// The column header (two comment lines).
pub fn header(quant: bool) -> String {
    let mut h = format!(
        "# {:>12} {:>11} {:>7} {:>5} {:>4} {:>4} {:>12} {:>12} {:>8} {:>8} {:>12} {:>12} {:>7}",
        "size",
        "count",
        "type",
        "redop",
        "pool",
        "conc",
        "time(us)",
        "min(us)",
        "algbw",
        "busbw",
        "tx(B)",
        "rx(B)",
        "#wrong"
    );
    if quant {
        h.push_str(&format!(" {:>8} {:>10}", "wirebw", "maxerr"));
    }
    let mut u = format!(
        "# {:>12} {:>11} {:>7} {:>5} {:>4} {:>4} {:>12} {:>12} {:>8} {:>8} {:>12} {:>12} {:>7}",
        "(B)",
        "(elements)",
        "",
        "",
        "",
        "",
        "median",
        "",
        "(GB/s)",
        "(GB/s)",
        "per peer",
        "per peer",
        ""
    );
    if quant {
        u.push_str(&format!(" {:>8} {:>10}", "(GB/s)", ""));
    }
    format!("{h}\n{u}")
}

/// One table line.
pub fn format_row(r: &Row, quant: bool) -> String {
    let mut s = format!(
        "  {:>12} {:>11} {:>7} {:>5} {:>4} {:>4} {:>12.1} {:>12.1} {:>8.3} {:>8.3} {:>12} {:>12} {:>7} {:>10.0}",
        r.bytes,
        r.count,
        r.dtype,
        r.op,
        r.pool,
        r.conc,
        r.median_us(),
        r.min_us(),
        r.algbw(),
        r.busbw(),
        r.tx,
        r.rx,
        r.errors(),
        r.cpu_us
    );
    if quant {
        let e = r
            .max_err
            .map_or_else(|| "-".to_string(), |e| format!("{e:.3e}"));
        s.push_str(&format!(" {:>8.3} {:>10}", r.wirebw(), e));
    }
    s
}

/// Summary of one configuration (pool size, concurrency): a comment line.
pub fn config_summary(rows: &[Row]) -> Option<String> {
    let first = rows.first()?;
    let avg = rows.iter().map(Row::busbw).sum::<f64>() / rows.len() as f64;
    let last = rows.iter().max_by_key(|r| r.bytes)?;
    Some(format!(
        "# [N={} pool {} conc {}] avg busbw {:.3} GB/s, busbw at {} {:.3} GB/s (CPU {:.2} ns per byte sent), errors {}",
        first.world,
        first.pool,
        first.conc,
        avg,
        human_bytes(last.bytes),
        last.busbw(),
        last.cpu_ns_per_byte(),
        rows.iter().map(Row::errors).sum::<u64>()
    ))
}

/// Ring-probe figure for a number of connections per link.
#[derive(Debug, Clone)]
pub struct ProbeFigure {
    pub procs: u32,
    pub conns: u32,
    /// Bytes of the buffer each connection walks through.
    pub span: u64,
    /// Per-link GB/s of each round.
    pub rounds: Vec<f64>,
    /// CPU nanoseconds per byte sent (mean over processes) of each round.
    pub cpu_ns_per_byte: Vec<f64>,
}

impl ProbeFigure {
    pub fn median(&self) -> f64 {
        median(&self.rounds)
    }
    pub fn best(&self) -> f64 {
        self.rounds.iter().copied().fold(f64::NAN, f64::max)
    }
    pub fn cpu_ns_per_byte(&self) -> f64 {
        median(&self.cpu_ns_per_byte)
    }
}

/// The last line: averages, the largest size against the probe, the
/// smallest size's latency, and the verification outcome.
pub fn final_summary(
    world: u32,
    rows: &[Row],
    probes: &[ProbeFigure],
    failures: &[String],
) -> String {
    let mut parts = Vec::new();
    let world = rows.first().map_or(world, |r| r.world);
    parts.push(format!("N={world}"));
    if !rows.is_empty() {
        let avg = rows.iter().map(Row::busbw).sum::<f64>() / rows.len() as f64;
        parts.push(format!("avg busbw {avg:.3} GB/s"));
    }
    if let Some(max_bytes) = rows.iter().map(|r| r.bytes).max() {
        // Best configuration at the largest size.
        if let Some(best) = rows
            .iter()
            .filter(|r| r.bytes == max_bytes)
            .max_by(|a, b| a.busbw().total_cmp(&b.busbw()))
        {
            parts.push(format!(
                "busbw at {} {:.3} GB/s (pool {}, conc {})",
                human_bytes(max_bytes),
                best.busbw(),
                best.pool,
                best.conc
            ));
            let probe = probes
                .iter()
                .find(|p| p.conns == best.pool)
                .or(probes.first());
            if let Some(p) = probe {
                parts.push(format!(
                    "probe per-link {:.3} GB/s ({} conn{}, {} buffer)",
                    p.median(),
                    p.conns,
                    if p.conns == 1 { "" } else { "s" },
                    human_bytes(p.span)
                ));
                parts.push(format!("ratio {:.2}", best.busbw() / p.median()));
                if let Some(m) = probes
                    .iter()
                    .find(|m| m.conns == p.conns && m.span != p.span && m.span >= max_bytes)
                {
                    parts.push(format!(
                        "probe through a {} buffer {:.3} GB/s, ratio {:.2}",
                        human_bytes(m.span),
                        m.median(),
                        best.busbw() / m.median()
                    ));
                }
                parts.push(format!(
                    "CPU per byte sent {:.2} ns vs probe {:.2} ns",
                    best.cpu_ns_per_byte(),
                    p.cpu_ns_per_byte()
                ));
            }
        }
    } else if let Some(p) = probes.first() {
        parts.push(format!("probe per-link {:.3} GB/s", p.median()));
    }
    if let Some(min_bytes) = rows.iter().map(|r| r.bytes).min() {
        if let Some(r) = rows
            .iter()
            .filter(|r| r.bytes == min_bytes && r.conc == 1)
            .min_by(|a, b| a.median_us().total_cmp(&b.median_us()))
        {
            parts.push(format!(
                "{} median {:.1} us",
                human_bytes(min_bytes),
                r.median_us()
            ));
        }
    }
    let errors: u64 = rows.iter().map(Row::errors).sum();
    let checked = rows.iter().filter(|r| r.checked > 0).count();
    let verdict = if rows.is_empty() && failures.is_empty() {
        "no all-reduce run".to_string()
    } else if !failures.is_empty() {
        format!("FAILED: {}", failures.join("; "))
    } else if errors > 0 {
        format!("{errors} ERRORS in {} results", rows.len())
    } else if checked == rows.len() {
        format!("all {} results verified", rows.len())
    } else {
        format!("{checked} of {} results verified, 0 errors", rows.len())
    };
    parts.push(verdict);
    format!("# pccl-bench: {}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(bytes: u64, us: f64) -> Row {
        Row {
            world: 2,
            pool: 1,
            conc: 1,
            bytes,
            count: bytes / 4,
            dtype: "f32".into(),
            op: "sum".into(),
            times_us: vec![us, us * 2.0, us / 2.0],
            tx: bytes,
            rx: bytes,
            wrong: 0,
            checked: 3,
            max_err: None,
            parity_errors: 0,
            cpu_us: 0.0,
            coll: super::super::Collective::AllReduce,
        }
    }

    #[test]
    fn bandwidths() {
        use super::super::Collective;
        let r = row(1_000_000, 1000.0);
        assert_eq!(r.median_us(), 1000.0);
        assert!((r.algbw() - 1.0).abs() < 1e-9);
        assert!((r.busbw() - 1.0).abs() < 1e-9); // 2(N-1)/N = 1 for N = 2
        let mut r4 = row(1_000_000, 1000.0);
        r4.world = 4;
        assert!((r4.busbw() - 1.5).abs() < 1e-9);
        r4.coll = Collective::Broadcast;
        assert!((r4.busbw() - 1.0).abs() < 1e-9);
        r4.coll = Collective::AllGather;
        assert!((r4.busbw() - 0.75).abs() < 1e-9);
        r4.coll = Collective::ReduceScatter;
        assert!((r4.busbw() - 0.75).abs() < 1e-9);
        assert_eq!(median(&[1.0, 2.0, 3.0, 4.0]), 2.5);
    }

    #[test]
    fn summary_mentions_ratio() {
        let rows = vec![row(4, 100.0), row(1 << 20, 1000.0)];
        let p = ProbeFigure {
            procs: 2,
            conns: 1,
            span: 512 << 10,
            rounds: vec![2.0, 2.0],
            cpu_ns_per_byte: vec![1.0],
        };
        let s = final_summary(2, &rows, &[p], &[]);
        assert!(s.contains("ratio"), "{s}");
        assert!(s.contains("all 2 results verified"), "{s}");
        assert!(s.contains("4 B median 100.0 us"), "{s}");
    }
}
