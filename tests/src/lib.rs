//! Helpers for the end-to-end tests.

/// A test seed: from the environment variable if set (to replay a failure), else random.
pub fn seed(var: &str) -> u64 {
    match std::env::var(var) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{var} must be a u64")),
        Err(_) => {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).expect("random source");
            u64::from_le_bytes(b)
        }
    }
}

/// The next value of a xorshift sequence (deterministic from the seed).
pub fn next(mut x: u64) -> u64 {
    x |= 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}
