//! [`TickJitter`]: the delay between two ticks of a collector.

use std::time::Duration;

use crate::monitor::configtrack;
use crate::profile::synthetic::SplitMix64;

/// Delays between collector ticks: the sampling interval ±20%, pseudo-random, averaging the
/// interval. Sampling at a fixed phase aliases with periodic guest activity: a connection opened
/// every second for 700 ms is seen at every tick or at none, depending on the phase. With jitter
/// the phase drifts by about a tenth of the interval per tick.
#[derive(Debug, Clone)]
pub struct TickJitter {
    rng: SplitMix64,
}

impl TickJitter {
    /// Jitter seeded from `service` and `seed` (e.g. the start time), so collectors started
    /// together do not tick together.
    pub fn new(service: &str, seed: u64) -> Self {
        TickJitter {
            rng: SplitMix64::new(configtrack::fnv1a64(service.as_bytes()) ^ seed.rotate_left(17)),
        }
    }

    /// The delay before the next tick.
    pub fn next_delay(&mut self, interval: Duration) -> Duration {
        // Uniform in [0.8, 1.2).
        interval.mul_f64(0.8 + 0.4 * self.rng.next_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_delays_are_jittered_around_the_interval() {
        let interval = Duration::from_secs(1);
        let mut j = TickJitter::new("web", 1_700_000_000_000);
        let delays: Vec<Duration> = (0..1000).map(|_| j.next_delay(interval)).collect();
        assert!(delays
            .iter()
            .all(|d| *d >= Duration::from_millis(800) && *d < Duration::from_millis(1200)));
        let mean = delays.iter().sum::<Duration>().as_secs_f64() / 1000.0;
        assert!((mean - 1.0).abs() < 0.02, "mean delay {mean}");
        // Spread over the whole range, not stuck.
        assert!(delays.iter().any(|d| *d < Duration::from_millis(850)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(1150)));
        // Different services, different sequences; zero seeds still work.
        let mut other = TickJitter::new("db", 1_700_000_000_000);
        let mut same = TickJitter::new("web", 1_700_000_000_000);
        assert_ne!(other.next_delay(interval), same.next_delay(interval));
        let mut empty = TickJitter::new("", 0);
        let firsts: Vec<Duration> = (0..3).map(|_| empty.next_delay(interval)).collect();
        assert!(
            firsts[0] != firsts[1] || firsts[1] != firsts[2],
            "{firsts:?}"
        );
    }
}
