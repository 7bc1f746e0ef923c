//! A small seeded random generator (xoshiro256++ seeded through SplitMix64).
//!
//! Candle's CPU random ops cannot be seeded, so everything random in nanogpt (weight init, batch
//! sampling, the seeds of the dropout masks, token sampling) draws from this generator instead.
//! Its whole state is four `u64`s, which the checkpoint stores so that a resumed run continues
//! the same stream.

use anyhow::{bail, Context, Result};

/// The xoshiro256++ generator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// A generator for `seed`; `stream` picks one of many independent sequences for that seed.
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut x = seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
        Self {
            s: std::array::from_fn(|_| splitmix64(&mut x)),
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let out = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// A uniform `f64` in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform integer in `0..n` (`n > 0`), without modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        // Lemire's multiply-and-reject method.
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// `n` samples of a normal distribution N(0, std²), by the Box-Muller transform.
    pub fn normal_vec(&mut self, n: usize, std: f64) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            let u1 = 1.0 - self.uniform(); // in (0, 1], so the log is finite
            let u2 = self.uniform();
            let r = (-2.0 * u1.ln()).sqrt() * std;
            let (sin, cos) = (std::f64::consts::TAU * u2).sin_cos();
            out.push((r * cos) as f32);
            out.push((r * sin) as f32);
        }
        out.truncate(n);
        out
    }

    /// The state as text, for checkpoints.
    pub fn to_state_string(&self) -> String {
        self.s.map(|w| format!("{w:016x}")).join(":")
    }

    /// Restores a state written by [`Rng::to_state_string`].
    pub fn from_state_string(text: &str) -> Result<Self> {
        let words: Vec<&str> = text.split(':').collect();
        if words.len() != 4 {
            bail!("generator state `{text}` should be four hex words separated by `:`");
        }
        let mut s = [0u64; 4];
        for (slot, w) in s.iter_mut().zip(&words) {
            *slot = u64::from_str_radix(w, 16)
                .with_context(|| format!("generator state word `{w}` is not hexadecimal"))?;
        }
        if s == [0; 4] {
            bail!("generator state is all zeros, which xoshiro256++ cannot leave");
        }
        Ok(Self { s })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_and_streams_differ_and_repeat() {
        let a: Vec<u64> = (0..4).map(|_| Rng::new(1, 0).next_u64()).collect();
        assert!(a.iter().all(|&x| x == a[0]));
        assert_ne!(Rng::new(1, 0).next_u64(), Rng::new(2, 0).next_u64());
        assert_ne!(Rng::new(1, 0).next_u64(), Rng::new(1, 1).next_u64());
    }

    #[test]
    fn state_round_trip_continues_the_stream() {
        let mut a = Rng::new(1337, 3);
        a.next_u64();
        let mut b = Rng::from_state_string(&a.to_state_string()).unwrap();
        assert_eq!(a.next_u64(), b.next_u64());
        assert!(Rng::from_state_string("1:2").is_err());
        assert!(Rng::from_state_string("0:0:0:0").is_err());
        assert!(Rng::from_state_string("x:0:0:1").is_err());
    }

    #[test]
    fn distributions_have_the_right_moments() {
        let mut r = Rng::new(7, 0);
        let xs = r.normal_vec(100_001, 2.0);
        assert_eq!(xs.len(), 100_001);
        let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(
            mean.abs() < 0.03 && (var.sqrt() - 2.0).abs() < 0.03,
            "{mean} {var}"
        );
        let counts = (0..60_000).fold([0usize; 3], |mut c, _| {
            c[r.below(3) as usize] += 1;
            c
        });
        assert!(
            counts.iter().all(|&c| (19_000..21_000).contains(&c)),
            "{counts:?}"
        );
    }
}
