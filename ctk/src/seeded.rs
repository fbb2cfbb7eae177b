//! A small seeded generator (xorshift64) for what must be repeatable from a seed: test data,
//! workloads, the demo's image, benchmarks. The same seed gives the same stream on every
//! machine. Never for keys, generations or anything that must not be guessed
//! (`Generation::random` reads the operating system's source).

/// xorshift64 (shifts 13, 7, 17). The seed must not be zero (a zero state stays zero).
#[derive(Clone, Debug)]
pub struct XorShift64(pub u64);

impl XorShift64 {
    /// The next number of the stream.
    #[allow(clippy::should_implement_trait)] // an endless stream, not an iterator of options
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Below `n` (n > 0), with the slight bias of a modulo, which tests do not mind.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_is_the_one_the_tests_were_written_against() {
        let mut r = XorShift64(1);
        assert_eq!(
            [r.next(), r.next(), r.next()],
            [
                1_082_269_761,
                1_152_992_998_833_853_505,
                11_177_516_664_432_764_457
            ]
        );
        let mut a = XorShift64(0x5eed);
        let mut b = a.clone();
        assert!((0..100).all(|_| a.below(7) == b.below(7)));
    }
}
