//! TEMPORARY stub (replaced by the real generator from branch moe-aux).
pub const DOMAINS: [&str; 3] = ["arith", "code", "text"];
pub struct Vocab;
impl Vocab {
    pub fn size() -> usize {
        40
    }
}
pub struct Corpus {
    train: Vec<Vec<u32>>,
    val: Vec<Vec<u32>>,
}
impl Corpus {
    pub fn generate(seed: u64, train_tokens: usize, val_tokens: usize) -> Corpus {
        let g = |d: usize, n: usize, s: u64| {
            (0..n)
                .map(|i| ((i as u64 * (d as u64 + 1) + s) % 13 + d as u64 * 13) as u32)
                .collect()
        };
        Corpus {
            train: (0..3).map(|d| g(d, train_tokens, seed)).collect(),
            val: (0..3).map(|d| g(d, val_tokens, seed + 1)).collect(),
        }
    }
    pub fn train(&self, domain: usize) -> &[u32] {
        &self.train[domain]
    }
    pub fn validation(&self, domain: usize) -> &[u32] {
        &self.val[domain]
    }
}
pub struct Batch {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub domains: Vec<usize>,
    pub batch: usize,
    pub seq_len: usize,
}
pub struct Sampler {
    home: usize,
    batch: usize,
    seq_len: usize,
    i: usize,
}
impl Sampler {
    pub fn new(
        corpus: &Corpus,
        home_domain: usize,
        skew: f64,
        batch: usize,
        seq_len: usize,
        seed: u64,
    ) -> Result<Sampler, String> {
        let _ = (corpus, skew, seed);
        Ok(Sampler {
            home: home_domain,
            batch,
            seq_len,
            i: 0,
        })
    }
    pub fn next_batch(&mut self, corpus: &Corpus) -> Batch {
        let t = corpus.train(self.home);
        let mut inputs = Vec::new();
        let mut targets = Vec::new();
        for _ in 0..self.batch {
            let o = self.i % (t.len() - self.seq_len - 1);
            self.i += 7;
            inputs.extend_from_slice(&t[o..o + self.seq_len]);
            targets.extend_from_slice(&t[o + 1..o + 1 + self.seq_len]);
        }
        Batch {
            inputs,
            targets,
            domains: vec![self.home; self.batch],
            batch: self.batch,
            seq_len: self.seq_len,
        }
    }
}
pub fn validation_batches(
    corpus: &Corpus,
    domain: usize,
    batch: usize,
    seq_len: usize,
    max_seqs: usize,
) -> Result<Vec<Batch>, String> {
    let t = corpus.validation(domain);
    let mut out = Vec::new();
    let n = ((t.len() - 1) / seq_len).min(max_seqs);
    let mut s = 0;
    while s < n {
        let b = batch.min(n - s);
        let mut inputs = Vec::new();
        let mut targets = Vec::new();
        for j in s..s + b {
            inputs.extend_from_slice(&t[j * seq_len..(j + 1) * seq_len]);
            targets.extend_from_slice(&t[j * seq_len + 1..(j + 1) * seq_len + 1]);
        }
        out.push(Batch {
            inputs,
            targets,
            domains: vec![domain; b],
            batch: b,
            seq_len,
        });
        s += b;
    }
    Ok(out)
}
