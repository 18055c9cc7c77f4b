//! A generated mixed-domain character corpus (nothing is downloaded) and the samplers over it.
//!
//! Three domains with clearly different statistics, each learnable by a tiny model:
//! * `arith`: arithmetic expressions with their correct results (`12+7=19; 3*4-5=7;`),
//! * `code`: a bracketed code-like language whose brackets are always properly nested,
//! * `text`: Markov-chain prose over a fixed list of lowercase words.
//!
//! [`Vocab`] is the character vocabulary shared by all domains, [`Corpus`] holds each domain's
//! training and held-out validation tokens, [`Sampler`] draws one peer's domain-skewed training
//! batches and [`validation_batches`] cuts deterministic evaluation batches.
//! Everything is a pure function of the seeds.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Names of the domains; a domain index is a position in this array.
pub const DOMAINS: [&str; 3] = ["arith", "code", "text"];

/// The vocabulary's symbols; a token id is a position in this string.
/// `?` is deliberately absent: [`Vocab::decode`] renders unknown ids as `?`.
const SYMBOLS: &[u8] = b"\n 0123456789abcdefghijklmnopqrstuvwxyz+-*/=;:()[]{}<>,._!'\"#";

/// Byte -> token id (`u8::MAX` = not in the vocabulary), built at compile time.
const ENCODE_TABLE: [u8; 128] = {
    let mut table = [u8::MAX; 128];
    let mut i = 0;
    while i < SYMBOLS.len() {
        table[SYMBOLS[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// Char-level vocabulary shared by all domains (fixed, at most 64 symbols).
pub struct Vocab;

impl Vocab {
    /// Number of token ids.
    pub fn size() -> usize {
        SYMBOLS.len()
    }

    /// Token ids of `s`; the error names the first character outside the vocabulary.
    pub fn encode(s: &str) -> Result<Vec<u32>, String> {
        s.chars()
            .enumerate()
            .map(|(pos, c)| {
                let id = if c.is_ascii() {
                    ENCODE_TABLE[c as usize]
                } else {
                    u8::MAX
                };
                if id == u8::MAX {
                    Err(format!(
                        "character {c:?} at position {pos} is not in the vocabulary"
                    ))
                } else {
                    Ok(u32::from(id))
                }
            })
            .collect()
    }

    /// The text of `ids`; ids outside the vocabulary render as `?`.
    pub fn decode(ids: &[u32]) -> String {
        ids.iter()
            .map(|&id| match SYMBOLS.get(id as usize) {
                Some(&b) => b as char,
                None => '?',
            })
            .collect()
    }

    /// The token id of a vocabulary byte (for generators, whose output is known to be valid).
    fn id(b: u8) -> u32 {
        let id = ENCODE_TABLE.get(b as usize).copied().unwrap_or(u8::MAX);
        assert!(id != u8::MAX, "generator produced {:?}", b as char);
        u32::from(id)
    }
}

/// Per domain: training tokens and held-out validation tokens.
pub struct Corpus {
    train: Vec<Vec<u32>>,
    validation: Vec<Vec<u32>>,
}

/// A well-mixed 64-bit value from `seed`, a domain and a stream (train, validation, table), so
/// that every stream gets its own generator.
fn sub_seed(seed: u64, domain: usize, stream: u64) -> u64 {
    // splitmix64 finalizer over a distinct combination of the inputs
    let mut z = seed
        ^ (domain as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (stream + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const TRAIN_STREAM: u64 = 0;
const VALIDATION_STREAM: u64 = 1;
const TABLE_STREAM: u64 = 2;

impl Corpus {
    /// Generates `train_tokens` training tokens and `val_tokens` validation tokens per domain from
    /// `seed`. Validation comes from a different random stream than train (same language), so it
    /// is held out.
    pub fn generate(seed: u64, train_tokens: usize, val_tokens: usize) -> Corpus {
        // The prose's transition table is part of the "language": shared by train and validation.
        let chain = MarkovChain::new(&mut StdRng::seed_from_u64(sub_seed(seed, 2, TABLE_STREAM)));
        let mut train = Vec::with_capacity(DOMAINS.len());
        let mut validation = Vec::with_capacity(DOMAINS.len());
        for domain in 0..DOMAINS.len() {
            for (stream, n, out) in [
                (TRAIN_STREAM, train_tokens, &mut train),
                (VALIDATION_STREAM, val_tokens, &mut validation),
            ] {
                let mut rng = StdRng::seed_from_u64(sub_seed(seed, domain, stream));
                let text = generate_domain_text(domain, &chain, &mut rng, n);
                out.push(text.bytes().take(n).map(Vocab::id).collect());
            }
        }
        Corpus { train, validation }
    }

    /// Number of domains (always `DOMAINS.len()`).
    pub fn num_domains(&self) -> usize {
        self.train.len()
    }

    /// Training tokens of `domain`. Panics when `domain >= DOMAINS.len()`.
    pub fn train(&self, domain: usize) -> &[u32] {
        &self.train[domain]
    }

    /// Held-out validation tokens of `domain`. Panics when `domain >= DOMAINS.len()`.
    pub fn validation(&self, domain: usize) -> &[u32] {
        &self.validation[domain]
    }
}

/// At least `min_chars` characters of `domain`'s language.
fn generate_domain_text(
    domain: usize,
    chain: &MarkovChain,
    rng: &mut StdRng,
    min_chars: usize,
) -> String {
    let mut out = String::with_capacity(min_chars + 128);
    while out.len() < min_chars {
        match domain {
            0 => arith_expression(rng, &mut out),
            1 => code_item(rng, &mut out),
            _ => chain.sentence(rng, &mut out),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// arith

/// One expression with its result, `a op b [op c] = r;`, then a space or a newline.
fn arith_expression(rng: &mut StdRng, out: &mut String) {
    let ops = [b'+', b'-', b'*'];
    let n_ops = rng.gen_range(1..=2);
    let mut op = Vec::with_capacity(n_ops);
    for _ in 0..n_ops {
        op.push(ops[rng.gen_range(0..ops.len())]);
    }
    // Small factors keep products short and learnable.
    let operand = |rng: &mut StdRng, next_to_star: bool| -> i64 {
        if next_to_star {
            rng.gen_range(0..=12)
        } else {
            rng.gen_range(0..=50)
        }
    };
    let nums: Vec<i64> = (0..=n_ops)
        .map(|i| {
            let star = (i > 0 && op[i - 1] == b'*') || op.get(i) == Some(&b'*');
            operand(rng, star)
        })
        .collect();
    let apply = |a: i64, o: u8, b: i64| match o {
        b'+' => a + b,
        b'-' => a - b,
        _ => a * b,
    };
    // '*' binds tighter than '+'/'-'; equal precedence associates to the left.
    let result = if n_ops == 1 {
        apply(nums[0], op[0], nums[1])
    } else if op[1] == b'*' && op[0] != b'*' {
        apply(nums[0], op[0], nums[1] * nums[2])
    } else {
        apply(apply(nums[0], op[0], nums[1]), op[1], nums[2])
    };
    for (i, n) in nums.iter().enumerate() {
        out.push_str(&n.to_string());
        if let Some(&o) = op.get(i) {
            out.push(o as char);
        }
    }
    out.push('=');
    out.push_str(&result.to_string());
    out.push(';');
    out.push(if rng.gen_bool(0.2) { '\n' } else { ' ' });
}

// ---------------------------------------------------------------------------------------------
// code

const CODE_IDENTS: [&str; 10] = ["x", "y", "z", "i", "n", "acc", "len", "sum", "buf", "k"];
const CODE_FUNCS: [&str; 6] = ["f", "g", "max", "min", "push", "get"];
/// Deepest nesting of blocks/expressions; keeps items short.
const CODE_MAX_DEPTH: usize = 2;

/// One function definition on its own line; brackets are nested and matched by construction.
fn code_item(rng: &mut StdRng, out: &mut String) {
    out.push_str("fn ");
    out.push_str(CODE_FUNCS[rng.gen_range(0..CODE_FUNCS.len())]);
    out.push('(');
    let n_params = rng.gen_range(0..=2);
    for p in 0..n_params {
        if p > 0 {
            out.push_str(", ");
        }
        out.push_str(code_ident(rng));
    }
    out.push_str(") ");
    code_block(rng, out, 0);
    out.push('\n');
}

fn code_ident(rng: &mut StdRng) -> &'static str {
    CODE_IDENTS[rng.gen_range(0..CODE_IDENTS.len())]
}

/// `{ stmt stmt ... }`
fn code_block(rng: &mut StdRng, out: &mut String, depth: usize) {
    out.push_str("{ ");
    for _ in 0..rng.gen_range(1..=3) {
        code_statement(rng, out, depth);
        out.push(' ');
    }
    out.push('}');
}

fn code_statement(rng: &mut StdRng, out: &mut String, depth: usize) {
    let nested = depth < CODE_MAX_DEPTH;
    match rng.gen_range(0..if nested { 7 } else { 4 }) {
        0 => {
            out.push_str("let ");
            out.push_str(code_ident(rng));
            out.push_str(" = ");
            code_expr(rng, out, depth);
            out.push(';');
        }
        1 => {
            out.push_str(code_ident(rng));
            out.push_str(" = ");
            code_expr(rng, out, depth);
            out.push(';');
        }
        2 => {
            out.push_str("return ");
            code_expr(rng, out, depth);
            out.push(';');
        }
        3 => {
            code_call(rng, out, depth);
            out.push(';');
        }
        4 => {
            out.push_str("if (");
            code_cond(rng, out, depth);
            out.push_str(") ");
            code_block(rng, out, depth + 1);
            if rng.gen_bool(0.3) {
                out.push_str(" else ");
                code_block(rng, out, depth + 1);
            }
        }
        5 => {
            out.push_str("while (");
            code_cond(rng, out, depth);
            out.push_str(") ");
            code_block(rng, out, depth + 1);
        }
        _ => {
            let v = code_ident(rng);
            let n = rng.gen_range(1..=20);
            out.push_str(&format!("for ({v} = 0; {v} < {n}; {v} = {v} + 1) "));
            code_block(rng, out, depth + 1);
        }
    }
}

fn code_cond(rng: &mut StdRng, out: &mut String, depth: usize) {
    code_expr(rng, out, depth + 1);
    out.push_str([" < ", " > ", " == ", " <= "][rng.gen_range(0..4)]);
    code_expr(rng, out, depth + 1);
}

fn code_call(rng: &mut StdRng, out: &mut String, depth: usize) {
    out.push_str(CODE_FUNCS[rng.gen_range(0..CODE_FUNCS.len())]);
    out.push('(');
    for a in 0..rng.gen_range(1..=2) {
        if a > 0 {
            out.push_str(", ");
        }
        code_expr(rng, out, depth + 1);
    }
    out.push(')');
}

fn code_expr(rng: &mut StdRng, out: &mut String, depth: usize) {
    let compound = depth < CODE_MAX_DEPTH;
    match rng.gen_range(0..if compound { 6 } else { 2 }) {
        0 => out.push_str(code_ident(rng)),
        1 => out.push_str(&rng.gen_range(0..100).to_string()),
        2 => code_call(rng, out, depth),
        3 => {
            out.push('[');
            for e in 0..rng.gen_range(1..=3) {
                if e > 0 {
                    out.push_str(", ");
                }
                code_expr(rng, out, depth + 1);
            }
            out.push(']');
        }
        4 => {
            out.push('(');
            code_expr(rng, out, depth + 1);
            out.push_str([" + ", " - ", " * "][rng.gen_range(0..3)]);
            code_expr(rng, out, depth + 1);
            out.push(')');
        }
        _ => {
            out.push_str(code_ident(rng));
            out.push('[');
            code_expr(rng, out, depth + 1);
            out.push(']');
        }
    }
}

// ---------------------------------------------------------------------------------------------
// text

const WORDS: [&str; 50] = [
    "the", "a", "one", "my", "your", "this", "that", "old", "young", "cat", "dog", "bird", "fish",
    "man", "woman", "child", "king", "river", "tree", "house", "stone", "ship", "road", "sees",
    "likes", "finds", "eats", "takes", "makes", "runs", "sleeps", "sings", "walks", "big", "small",
    "red", "green", "quiet", "happy", "dark", "near", "under", "over", "with", "and", "then",
    "but", "in", "very", "slowly",
];
/// Successors per word: sparse enough that the prose is predictable.
const SUCCESSORS: usize = 4;

/// A seeded sparse word-transition table.
struct MarkovChain {
    /// next[w] = (successor word, cumulative weight)
    next: Vec<Vec<(usize, u32)>>,
}

impl MarkovChain {
    fn new(rng: &mut StdRng) -> MarkovChain {
        let next = (0..WORDS.len())
            .map(|_| {
                let mut successors: Vec<(usize, u32)> = Vec::with_capacity(SUCCESSORS);
                let mut total = 0;
                while successors.len() < SUCCESSORS {
                    let w = rng.gen_range(0..WORDS.len());
                    if successors.iter().any(|&(s, _)| s == w) {
                        continue;
                    }
                    total += rng.gen_range(1..=9);
                    successors.push((w, total));
                }
                successors
            })
            .collect();
        MarkovChain { next }
    }

    fn step(&self, rng: &mut StdRng, word: usize) -> usize {
        let successors = &self.next[word];
        let total = successors.last().map_or(1, |&(_, c)| c);
        let r = rng.gen_range(0..total);
        successors
            .iter()
            .find(|&&(_, c)| r < c)
            .map_or(successors[0].0, |&(w, _)| w)
    }

    /// One sentence of 3..=12 words ending in a period, then a space or a newline.
    fn sentence(&self, rng: &mut StdRng, out: &mut String) {
        let mut word = rng.gen_range(0..WORDS.len());
        let len = rng.gen_range(3..=12);
        for i in 0..len {
            if i > 0 {
                out.push(' ');
                word = self.step(rng, word);
            }
            out.push_str(WORDS[word]);
        }
        out.push('.');
        out.push(if rng.gen_bool(0.2) { '\n' } else { ' ' });
    }
}

// ---------------------------------------------------------------------------------------------
// batches

/// Sequences of next-token prediction: `targets` are `inputs` shifted by one token.
/// `inputs` and `targets` are row-major `batch × seq_len`.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    /// The domain of each sequence.
    pub domains: Vec<usize>,
    pub batch: usize,
    pub seq_len: usize,
}

impl Batch {
    fn with_capacity(batch: usize, seq_len: usize) -> Batch {
        Batch {
            inputs: Vec::with_capacity(batch * seq_len),
            targets: Vec::with_capacity(batch * seq_len),
            domains: Vec::with_capacity(batch),
            batch: 0,
            seq_len,
        }
    }

    /// Appends the window `tokens[start..start + seq_len + 1]`.
    fn push_window(&mut self, tokens: &[u32], start: usize, domain: usize) {
        let window = &tokens[start..start + self.seq_len + 1];
        self.inputs.extend_from_slice(&window[..self.seq_len]);
        self.targets.extend_from_slice(&window[1..]);
        self.domains.push(domain);
        self.batch += 1;
    }
}

/// Training stream of one peer: each sequence is a random window of the home domain's training
/// tokens with probability `skew`, else of one of the other domains (uniformly).
/// `skew = 1/3` is uniform.
pub struct Sampler {
    home_domain: usize,
    skew: f64,
    batch: usize,
    seq_len: usize,
    rng: StdRng,
}

fn check_shape(batch: usize, seq_len: usize) -> Result<(), String> {
    if batch == 0 {
        return Err("batch size must be at least 1".into());
    }
    if seq_len == 0 {
        return Err("sequence length must be at least 1".into());
    }
    Ok(())
}

fn check_domain(domain: usize) -> Result<(), String> {
    if domain >= DOMAINS.len() {
        return Err(format!(
            "domain {domain} is out of range (there are {} domains: {})",
            DOMAINS.len(),
            DOMAINS.join(", ")
        ));
    }
    Ok(())
}

impl Sampler {
    /// Checks everything up front: `home_domain` in range, `skew` in [0, 1], `batch` and
    /// `seq_len` positive, and every domain with at least `seq_len + 1` training tokens.
    pub fn new(
        corpus: &Corpus,
        home_domain: usize,
        skew: f64,
        batch: usize,
        seq_len: usize,
        seed: u64,
    ) -> Result<Sampler, String> {
        check_domain(home_domain).map_err(|e| format!("home {e}"))?;
        if !(0.0..=1.0).contains(&skew) {
            return Err(format!("skew {skew} is outside [0, 1]"));
        }
        check_shape(batch, seq_len)?;
        for (d, name) in DOMAINS.iter().enumerate() {
            let n = corpus.train(d).len();
            if n < seq_len + 1 {
                return Err(format!(
                    "domain {name} has {n} training tokens, fewer tokens than the sequence length \
                     {seq_len} + 1"
                ));
            }
        }
        Ok(Sampler {
            home_domain,
            skew,
            batch,
            seq_len,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    /// The next `batch` random windows. `corpus` must be the one given to [`Sampler::new`]
    /// (panics when a domain is shorter than `seq_len + 1` tokens).
    pub fn next_batch(&mut self, corpus: &Corpus) -> Batch {
        let mut out = Batch::with_capacity(self.batch, self.seq_len);
        let others = DOMAINS.len() - 1;
        for _ in 0..self.batch {
            let domain = if self.rng.gen_bool(self.skew) {
                self.home_domain
            } else {
                // uniform over the other domains: skip over the home index
                let k = self.rng.gen_range(0..others);
                if k >= self.home_domain {
                    k + 1
                } else {
                    k
                }
            };
            let tokens = corpus.train(domain);
            assert!(
                tokens.len() > self.seq_len,
                "Sampler used with a corpus whose domain {} is too short",
                DOMAINS[domain]
            );
            let start = self.rng.gen_range(0..=tokens.len() - self.seq_len - 1);
            out.push_window(tokens, start, domain);
        }
        out
    }
}

/// Deterministic validation batches of one domain: consecutive non-overlapping windows (input
/// windows start every `seq_len` tokens, so each validation token is predicted once), at most
/// `max_seqs` sequences, packed `batch` per [`Batch`] (the last one may be smaller).
/// Errors for an out-of-range domain, `batch`, `seq_len` or `max_seqs` of 0, and a domain with
/// fewer than `seq_len + 1` validation tokens.
pub fn validation_batches(
    corpus: &Corpus,
    domain: usize,
    batch: usize,
    seq_len: usize,
    max_seqs: usize,
) -> Result<Vec<Batch>, String> {
    check_domain(domain)?;
    check_shape(batch, seq_len)?;
    if max_seqs == 0 {
        return Err("max_seqs must be at least 1".into());
    }
    let tokens = corpus.validation(domain);
    if tokens.len() < seq_len + 1 {
        return Err(format!(
            "domain {} has {} validation tokens, fewer tokens than the sequence length {seq_len} + 1",
            DOMAINS[domain],
            tokens.len()
        ));
    }
    let n_seqs = ((tokens.len() - 1) / seq_len).min(max_seqs);
    let mut batches = Vec::with_capacity(n_seqs.div_ceil(batch));
    for first in (0..n_seqs).step_by(batch) {
        let mut b = Batch::with_capacity(batch, seq_len);
        for s in first..(first + batch).min(n_seqs) {
            b.push_window(tokens, s * seq_len, domain);
        }
        batches.push(b);
    }
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Corpus {
        Corpus::generate(7, 20_000, 4_000)
    }

    fn text(corpus: &Corpus, domain: usize) -> String {
        Vocab::decode(corpus.train(domain))
    }

    #[test]
    fn vocabulary_is_small_and_unique() {
        assert!(Vocab::size() <= 64);
        for (i, &b) in SYMBOLS.iter().enumerate() {
            assert_eq!(
                ENCODE_TABLE[b as usize] as usize, i,
                "duplicate {:?}",
                b as char
            );
        }
        assert!(!SYMBOLS.contains(&b'?'));
    }

    #[test]
    fn encode_decode_round_trip() {
        let s = "if (x < 3) { y = f(x, [1, 2]); }\n12+7=19; the cat.";
        let ids = Vocab::encode(s).unwrap();
        assert_eq!(ids.len(), s.len());
        assert!(ids.iter().all(|&i| (i as usize) < Vocab::size()));
        assert_eq!(Vocab::decode(&ids), s);
    }

    #[test]
    fn encode_names_the_first_unknown_char() {
        let err = Vocab::encode("ab?cÄ").unwrap_err();
        assert!(err.contains("'?'") && err.contains("position 2"), "{err}");
        let err = Vocab::encode("abcÄ").unwrap_err();
        assert!(err.contains("'Ä'"), "{err}");
        let err = Vocab::encode("ABC").unwrap_err();
        assert!(err.contains("'A'"), "{err}");
    }

    #[test]
    fn decode_renders_unknown_ids_as_question_marks() {
        let size = Vocab::size() as u32;
        assert_eq!(Vocab::decode(&[2, size, 3, u32::MAX]), "0?1?");
    }

    #[test]
    fn generation_is_deterministic_and_sized() {
        let a = Corpus::generate(42, 5_000, 1_000);
        let b = Corpus::generate(42, 5_000, 1_000);
        let c = Corpus::generate(43, 5_000, 1_000);
        for d in 0..DOMAINS.len() {
            assert_eq!(a.train(d), b.train(d));
            assert_eq!(a.validation(d), b.validation(d));
            assert_ne!(a.train(d), c.train(d));
            assert_eq!(a.train(d).len(), 5_000);
            assert_eq!(a.validation(d).len(), 1_000);
            // held out: validation is not a copy of the start of train
            assert_ne!(&a.train(d)[..1_000], a.validation(d));
        }
        assert_eq!(a.num_domains(), DOMAINS.len());
    }

    #[test]
    fn all_generated_chars_are_in_the_vocabulary() {
        let chain = MarkovChain::new(&mut StdRng::seed_from_u64(1));
        for d in 0..DOMAINS.len() {
            let s = generate_domain_text(d, &chain, &mut StdRng::seed_from_u64(d as u64), 20_000);
            let ids = Vocab::encode(&s).unwrap();
            assert_eq!(Vocab::decode(&ids), s);
        }
    }

    #[test]
    fn domains_have_different_statistics() {
        let c = corpus();
        let (arith, code, prose) = (text(&c, 0), text(&c, 1), text(&c, 2));
        let digits = |s: &str| s.bytes().filter(u8::is_ascii_digit).count() as f64 / s.len() as f64;
        let brackets =
            |s: &str| s.bytes().filter(|b| b"()[]{}".contains(b)).count() as f64 / s.len() as f64;
        assert!(digits(&arith) > 0.4, "{}", digits(&arith));
        assert!(brackets(&code) > 0.05, "{}", brackets(&code));
        assert_eq!(digits(&prose), 0.0);
        assert_eq!(brackets(&prose), 0.0);
        assert_eq!(brackets(&arith), 0.0);
        assert!(prose.contains(". "));
        assert!(prose
            .split(['.', ' ', '\n'])
            .filter(|w| !w.is_empty())
            .skip(1) // the stream may be cut mid-word only at its end, never at its start
            .take(1000)
            .all(|w| WORDS.contains(&w)));
    }

    /// Evaluates `a op b [op c]` with the usual precedence, independently of the generator.
    fn eval(expr: &str) -> i64 {
        let mut nums = Vec::new();
        let mut ops = Vec::new();
        let mut cur = String::new();
        for ch in expr.chars() {
            if ch.is_ascii_digit() {
                cur.push(ch);
            } else {
                nums.push(cur.parse::<i64>().unwrap());
                cur.clear();
                ops.push(ch);
            }
        }
        nums.push(cur.parse::<i64>().unwrap());
        // fold products first
        let mut terms = vec![nums[0]];
        let mut signs = Vec::new();
        for (op, n) in ops.iter().zip(&nums[1..]) {
            if *op == '*' {
                let last = terms.pop().unwrap();
                terms.push(last * n);
            } else {
                signs.push(*op);
                terms.push(*n);
            }
        }
        let mut acc = terms[0];
        for (s, t) in signs.iter().zip(&terms[1..]) {
            acc = if *s == '+' { acc + t } else { acc - t };
        }
        acc
    }

    #[test]
    fn arithmetic_results_are_correct() {
        let c = corpus();
        let s = text(&c, 0);
        let exprs: Vec<&str> = s.split(';').map(str::trim).collect();
        // drop the last piece, which may be cut off by the token budget
        let exprs = &exprs[..exprs.len() - 1];
        assert!(exprs.len() > 500);
        let mut saw_two_ops = false;
        for e in exprs {
            let (lhs, rhs) = e.split_once('=').unwrap();
            saw_two_ops |= lhs.chars().filter(|c| "+-*".contains(*c)).count() == 2;
            assert_eq!(eval(lhs), rhs.parse::<i64>().unwrap(), "{e}");
        }
        assert!(saw_two_ops);
        assert_eq!(eval("3*4-5"), 7);
        assert_eq!(eval("2+3*4"), 14);
        assert_eq!(eval("10-3-2"), 5);
    }

    fn closing_matches(open: char, close: char) -> bool {
        matches!((open, close), ('(', ')') | ('[', ']') | ('{', '}'))
    }

    #[test]
    fn code_brackets_are_balanced() {
        let chain = MarkovChain::new(&mut StdRng::seed_from_u64(0));
        let mut rng = StdRng::seed_from_u64(5);
        let mut max_depth = 0;
        for _ in 0..300 {
            let mut item = String::new();
            code_item(&mut rng, &mut item);
            let mut stack = Vec::new();
            for ch in item.chars() {
                match ch {
                    '(' | '[' | '{' => stack.push(ch),
                    ')' | ']' | '}' => {
                        let open = stack.pop().expect("closing bracket without opening");
                        assert!(closing_matches(open, ch), "{item}");
                    }
                    _ => {}
                }
                max_depth = max_depth.max(stack.len());
            }
            assert!(stack.is_empty(), "{item}");
            assert!(item.ends_with("}\n"));
        }
        assert!(max_depth >= 4);
        // the corpus stream is whole items, so every prefix has no mismatched closing bracket
        let s = generate_domain_text(1, &chain, &mut rng, 10_000);
        let mut stack = Vec::new();
        for ch in s.chars() {
            match ch {
                '(' | '[' | '{' => stack.push(ch),
                ')' | ']' | '}' => assert!(closing_matches(stack.pop().unwrap(), ch)),
                _ => {}
            }
        }
        assert!(stack.is_empty());
    }

    #[test]
    fn skew_is_respected() {
        let c = corpus();
        for (home, skew, lo, hi) in [
            (0, 0.8, 0.72, 0.88),
            (2, 0.8, 0.72, 0.88),
            (1, 1.0 / 3.0, 0.28, 0.39),
            (1, 1.0, 1.0, 1.0),
            (1, 0.0, 0.0, 0.0),
        ] {
            let mut sampler = Sampler::new(&c, home, skew, 20, 16, 99).unwrap();
            let mut per_domain = [0usize; 3];
            for _ in 0..100 {
                let b = sampler.next_batch(&c);
                assert_eq!(b.domains.len(), 20);
                for &d in &b.domains {
                    per_domain[d] += 1;
                }
            }
            let frac = per_domain[home] as f64 / 2000.0;
            assert!((lo..=hi).contains(&frac), "home {home} skew {skew}: {frac}");
            if skew < 1.0 {
                // the others share the rest about equally
                let others: Vec<usize> = (0..3).filter(|&d| d != home).collect();
                let (a, b) = (per_domain[others[0]] as f64, per_domain[others[1]] as f64);
                assert!((a - b).abs() / (a + b) < 0.15, "{per_domain:?}");
            }
        }
    }

    #[test]
    fn targets_are_shifted_inputs_from_the_sampled_domain() {
        let c = corpus();
        let mut sampler = Sampler::new(&c, 1, 0.5, 8, 32, 3).unwrap();
        let b = sampler.next_batch(&c);
        assert_eq!((b.batch, b.seq_len), (8, 32));
        assert_eq!(b.inputs.len(), 8 * 32);
        assert_eq!(b.targets.len(), 8 * 32);
        for s in 0..b.batch {
            let inp = &b.inputs[s * 32..(s + 1) * 32];
            let tgt = &b.targets[s * 32..(s + 1) * 32];
            assert_eq!(&inp[1..], &tgt[..31]);
            // the window (inputs + last target) occurs in that domain's training tokens
            let mut window = inp.to_vec();
            window.push(tgt[31]);
            assert!(c.train(b.domains[s]).windows(33).any(|w| w == window));
        }
        // same seed, same stream; another seed, another stream
        let mut again = Sampler::new(&c, 1, 0.5, 8, 32, 3).unwrap();
        assert_eq!(again.next_batch(&c), b);
        let mut other = Sampler::new(&c, 1, 0.5, 8, 32, 4).unwrap();
        assert_ne!(other.next_batch(&c), b);
        assert_ne!(sampler.next_batch(&c), b);
    }

    #[test]
    fn sampler_errors() {
        let c = corpus();
        let err = |r: Result<Sampler, String>| r.err().unwrap();
        assert!(err(Sampler::new(&c, 3, 0.5, 4, 8, 0)).contains("out of range"));
        assert!(err(Sampler::new(&c, 0, 1.5, 4, 8, 0)).contains("skew"));
        assert!(err(Sampler::new(&c, 0, -0.1, 4, 8, 0)).contains("skew"));
        assert!(err(Sampler::new(&c, 0, f64::NAN, 4, 8, 0)).contains("skew"));
        assert!(err(Sampler::new(&c, 0, 0.5, 0, 8, 0)).contains("batch"));
        assert!(err(Sampler::new(&c, 0, 0.5, 4, 0, 0)).contains("sequence length"));
        let tiny = Corpus::generate(1, 10, 10);
        let e = err(Sampler::new(&tiny, 0, 0.5, 4, 10, 0));
        assert!(e.contains("fewer tokens than the sequence length"), "{e}");
        assert!(Sampler::new(&tiny, 0, 0.5, 4, 9, 0).is_ok());
    }

    #[test]
    fn validation_batches_cover_consecutive_windows() {
        let c = Corpus::generate(3, 1_000, 101);
        let batches = validation_batches(&c, 2, 4, 10, 100).unwrap();
        // (101 - 1) / 10 = 10 sequences: batches of 4, 4, 2
        assert_eq!(
            batches.iter().map(|b| b.batch).collect::<Vec<_>>(),
            vec![4, 4, 2]
        );
        let val = c.validation(2);
        let mut s = 0;
        for b in &batches {
            assert_eq!(b.inputs.len(), b.batch * 10);
            assert!(b.domains.iter().all(|&d| d == 2));
            for k in 0..b.batch {
                assert_eq!(&b.inputs[k * 10..(k + 1) * 10], &val[s * 10..s * 10 + 10]);
                assert_eq!(
                    &b.targets[k * 10..(k + 1) * 10],
                    &val[s * 10 + 1..s * 10 + 11]
                );
                s += 1;
            }
        }
        assert_eq!(validation_batches(&c, 2, 4, 10, 100).unwrap(), batches);
        let capped = validation_batches(&c, 0, 4, 10, 5).unwrap();
        assert_eq!(capped.iter().map(|b| b.batch).sum::<usize>(), 5);
        // exactly seq_len + 1 tokens is one sequence
        assert_eq!(validation_batches(&c, 0, 4, 100, 9).unwrap().len(), 1);
    }

    #[test]
    fn validation_batch_errors() {
        let c = Corpus::generate(3, 1_000, 50);
        let e = validation_batches(&c, 1, 4, 50, 10).unwrap_err();
        assert!(e.contains("fewer tokens than the sequence length"), "{e}");
        assert!(validation_batches(&c, 3, 4, 10, 10)
            .unwrap_err()
            .contains("out of range"));
        assert!(validation_batches(&c, 0, 0, 10, 10)
            .unwrap_err()
            .contains("batch"));
        assert!(validation_batches(&c, 0, 4, 0, 10)
            .unwrap_err()
            .contains("sequence length"));
        assert!(validation_batches(&c, 0, 4, 10, 0)
            .unwrap_err()
            .contains("max_seqs"));
    }
}
