//! Pen's server selection, as pure functions of the live state: which server
//! a new client tries first (`initial_server`), what it may take there
//! (`try_server`'s limits) and where it goes when that fails
//! (`failover_server`, then the emergency server).
//!
//! Nothing here touches sockets or clocks; the caller passes in a snapshot of
//! each server ([`Candidate`]) and reserves the connection slot itself.

pub mod acl;
pub mod client_table;
mod min_tree;

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::Mode;

pub use client_table::ClientKey;

/// What selection needs to know about one server right now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Candidate {
    /// Has an address and a port other than 0 (Pen skips the others).
    pub usable: bool,
    /// Skipped for new connections after a failed connect (`-b`).
    pub blacklisted: bool,
    /// Active connections, connects in progress included.
    pub conns: u32,
    /// Soft limit for every client; 0 = no limit.
    pub max: u32,
    /// Limit for clients tracked to this server; only matters above `max`.
    pub hard: u32,
    /// `-W` weight; 0 = never the first choice under `-W`.
    pub weight: u32,
    /// `prio` value; the lowest wins.
    pub prio: u32,
    /// The server's access list turns this client away. As in Pen's
    /// try_server, only the attempt checks it: the first-choice policies
    /// (and so the round-robin cursor) do not.
    pub denied: bool,
}

/// The regular servers, by index, as selection sees them.
pub trait Servers {
    /// How many regular servers there are (indices `0..count`).
    fn count(&self) -> usize;
    /// The state of server `index`, which is below [`Servers::count`].
    fn candidate(&self, index: usize) -> Candidate;
}

impl Servers for [Candidate] {
    fn count(&self) -> usize {
        self.len()
    }

    fn candidate(&self, index: usize) -> Candidate {
        self[index]
    }
}

impl Servers for Vec<Candidate> {
    fn count(&self) -> usize {
        self.len()
    }

    fn candidate(&self, index: usize) -> Candidate {
        self[index]
    }
}

/// Where a connection attempt goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// The regular server with this index.
    Server(usize),
    /// The `-e` server of last resort.
    Emergency,
    /// The `-B` server for clients the client ACL denies. Attempts never
    /// offer it: the driver asks [`abuse_choice`] instead, once.
    Abuse,
}

/// One attempt: the target and how many connections this client may see
/// there. The caller reserves a slot atomically against `limit`, because
/// other workers select at the same time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    pub target: Target,
    /// Connections allowed on the target for this client; None = unlimited.
    pub limit: Option<u32>,
}

/// The connection count a client may join on this server, from Pen's
/// `try_server` test `max != 0 && conns >= max && (!sticky || conns >= hard)`:
/// no limit when `max` is 0, `hard` for a client tracked here (`sticky`)
/// when `hard` is above `max`, else `max`.
pub fn conn_limit(c: &Candidate, sticky: bool) -> Option<u32> {
    match c.max {
        0 => None,
        max if sticky && c.hard > max => Some(c.hard),
        max => Some(max),
    }
}

/// Whether Pen's `try_server` would start a connect here: the server is
/// usable, not blacklisted, and below its limit for this client.
pub fn admissible(c: &Candidate, sticky: bool) -> bool {
    available(c) && !c.denied && conn_limit(c, sticky).is_none_or(|limit| c.conns < limit)
}

/// The `-B` server for a client the client ACL denied, when it can take the
/// connection: usable, not blacklisted, below its `max`. The driver offers it
/// once, as Pen never fails over from it. Unlike Pen, `-B`'s own access list
/// is not checked: Pen checks list 0, the default client ACL too, so a client
/// that list denies could never reach Pen's `-B`.
pub fn abuse_choice(abuse: Option<Candidate>) -> Option<Choice> {
    let abuse = abuse.map(|c| Candidate { denied: false, ..c })?;
    admissible(&abuse, false).then(|| Choice {
        target: Target::Abuse,
        limit: conn_limit(&abuse, false),
    })
}

/// Pen's `server_is_unavailable` negated: what the first-choice policies
/// skip. Limits are left to the attempt, as in Pen.
fn available(c: &Candidate) -> bool {
    c.usable && !c.blacklisted
}

/// Pen's round-robin cursor (`server_by_roundrobin`'s `last_server`),
/// shared by every worker.
#[derive(Debug, Default)]
pub struct RoundRobin {
    last: AtomicUsize,
}

impl RoundRobin {
    /// A cursor at server 0, so the first pick is server 1 (as in Pen).
    pub fn new() -> Self {
        Self::default()
    }

    /// The next server after the last pick for which `available` holds,
    /// wrapping around and ending with the last pick itself; None if there
    /// is none. Workers race through a compare-and-swap, so every pick
    /// advances from the previous one exactly as Pen's sequential loop does.
    pub fn next(&self, count: usize, available: impl Fn(usize) -> bool) -> Option<usize> {
        if count == 0 {
            return None;
        }
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            // Counting steps rather than stopping at `last` also ends the
            // loop when the server list shrank below the stored cursor.
            let pick = (1..=count)
                .map(|step| (last + step) % count)
                .find(|&i| available(i))?;
            match self
                .last
                .compare_exchange_weak(last, pick, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(pick),
                Err(current) => last = current,
            }
        }
    }
}

/// Pen's `initial_server`: the server a new connection tries first, or None
/// when the policy finds none.
///
/// - Tracking (unless `-r`): the client's tracked server, even if it is
///   blacklisted or full now; the attempt checks that and fails over.
/// - `prio`: the lowest prio among available servers, ties to the lowest index.
/// - `-W`: weighted least connections, `256 * conns / weight` (integer
///   division), ties to the lowest index; weight 0 is never chosen.
/// - `-h`: a hash of the client address, availability not checked.
/// - otherwise round robin over the available servers.
pub fn first_choice(
    mode: &Mode,
    servers: &(impl Servers + ?Sized),
    client: ClientKey,
    client_port: u16,
    tracked: Option<usize>,
    rr: &RoundRobin,
) -> Option<usize> {
    let count = servers.count();
    if !mode.roundrobin {
        if let Some(i) = tracked.filter(|&i| i < count) {
            return Some(i);
        }
    }
    let candidates = (0..count).map(|i| (i, servers.candidate(i)));
    if mode.prio {
        // min_by_key keeps the first of equal keys: the lowest index.
        candidates
            .filter(|(_, c)| available(c))
            .min_by_key(|(_, c)| c.prio)
            .map(|(i, _)| i)
    } else if mode.weight {
        candidates
            .filter(|(_, c)| available(c) && c.weight > 0)
            .min_by_key(|(_, c)| 256 * u64::from(c.conns) / u64::from(c.weight))
            .map(|(i, _)| i)
    } else if mode.hash {
        (count > 0).then(|| pen_hash(client, mode.roundrobin.then_some(client_port), count))
    } else {
        rr.next(count, |i| available(&servers.candidate(i)))
    }
}

/// Pen's `pen_hash`. For IPv4 it takes `s_addr`, the address in network
/// byte order, as a native integer (so on x86 the first octet is the least
/// significant byte); for IPv6 the last octet; Unix clients all hash to 0.
/// With `-r` (no tracking) an IPv4 client's port, `sin_port` as a native
/// integer too, is XORed in, so one client's connections spread out; IPv6
/// clients hash by address alone (both verified against Debian's pen 0.34.1).
fn pen_hash(client: ClientKey, port: Option<u16>, count: usize) -> usize {
    let port = port.map_or(0, |p| u32::from(u16::from_ne_bytes(p.to_be_bytes())));
    let value = match client {
        ClientKey::Ip(std::net::IpAddr::V4(v4)) => u64::from(u32::from_ne_bytes(v4.octets()) ^ port),
        ClientKey::Ip(std::net::IpAddr::V6(v6)) => u64::from(v6.octets()[15]),
        ClientKey::Unix => 0,
    };
    // `count` fits in u64 and the remainder is below it, so both casts are exact.
    (value % count as u64) as usize
}

/// The attempts for one client connection: the first choice, then
/// failover over the regular servers, then the emergency server.
///
/// Pen's `add_client`/`failover_server`, with two fixes:
/// - With no first choice (every server unavailable to the policy, or `-W`
///   with every weight 0), failover scans every server once from index 0.
///   Pen reaches its failover there only by accident (`add_client` tests for
///   -1, but `NO_SERVER` became -3), scanning from an invalid index.
/// - The emergency server is offered at most once per connection.
#[derive(Clone, Debug)]
pub struct Attempts {
    initial: Option<usize>,
    stage: Stage,
    last: Option<Target>,
}

#[derive(Clone, Copy, Debug)]
enum Stage {
    First,
    /// Failover has looked at `done` servers, starting after the initial one.
    Failover {
        done: usize,
    },
    Emergency,
    Exhausted,
}

impl Attempts {
    /// The attempts for a connection whose first choice is `first`.
    pub fn new(first: Option<usize>) -> Self {
        Attempts {
            initial: first,
            stage: Stage::First,
            last: None,
        }
    }

    /// The next target to try given the live state, or None: give up and
    /// close the client. Each call after the first means the previous target
    /// failed. `tracked` is the client's tracked server (it may use the
    /// `hard` limit there); `emergency` is the `-e` server, if configured.
    pub fn next(
        &mut self,
        mode: &Mode,
        servers: &(impl Servers + ?Sized),
        tracked: Option<usize>,
        emergency: Option<Candidate>,
    ) -> Option<Choice> {
        let count = servers.count();
        let offer_server = |i: usize| {
            let c = servers.candidate(i);
            let sticky = tracked == Some(i);
            admissible(&c, sticky).then(|| Choice {
                target: Target::Server(i),
                limit: conn_limit(&c, sticky),
            })
        };
        // A first choice beyond the list (it shrank since) counts as none.
        let initial = self.initial.filter(|&i| i < count);
        loop {
            let offer = match self.stage {
                Stage::First => {
                    self.stage = if mode.stubborn {
                        Stage::Exhausted
                    } else {
                        Stage::Failover { done: 0 }
                    };
                    initial.and_then(offer_server)
                }
                // Pen's `do { s = (s + 1) % n; try(s) } while (s != initial)`:
                // the initial server is retried last.
                Stage::Failover { done } if done < count => {
                    self.stage = Stage::Failover { done: done + 1 };
                    let start = initial.map_or(0, |i| i + 1);
                    offer_server((start + done) % count)
                }
                Stage::Failover { .. } => {
                    self.stage = Stage::Emergency;
                    None
                }
                Stage::Emergency => {
                    self.stage = Stage::Exhausted;
                    emergency.filter(|e| admissible(e, false)).map(|e| Choice {
                        target: Target::Emergency,
                        limit: conn_limit(&e, false),
                    })
                }
                Stage::Exhausted => return None,
            };
            if let Some(choice) = offer {
                self.last = Some(choice.target);
                return Some(choice);
            }
        }
    }

    /// The target most recently offered, if any.
    pub fn last(&self) -> Option<Target> {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use std::sync::Arc;

    fn up() -> Candidate {
        Candidate {
            usable: true,
            ..Candidate::default()
        }
    }

    fn down() -> Candidate {
        Candidate {
            blacklisted: true,
            ..up()
        }
    }

    fn ups(n: usize) -> Vec<Candidate> {
        vec![up(); n]
    }

    fn v4(last: u8) -> ClientKey {
        ClientKey::Ip(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
    }

    fn mode() -> Mode {
        Mode::default()
    }

    fn rr_mode() -> Mode {
        Mode {
            roundrobin: true,
            ..Mode::default()
        }
    }

    fn picks(rr: &RoundRobin, servers: &[Candidate], times: usize) -> Vec<Option<usize>> {
        (0..times)
            .map(|_| first_choice(&rr_mode(), servers, v4(1), 0, None, rr))
            .collect()
    }

    /// Every target `Attempts` offers until it gives up.
    fn drain(
        attempts: &mut Attempts,
        mode: &Mode,
        servers: &[Candidate],
        tracked: Option<usize>,
        emergency: Option<Candidate>,
    ) -> Vec<Target> {
        std::iter::from_fn(|| attempts.next(mode, servers, tracked, emergency))
            .map(|c| c.target)
            .collect()
    }

    #[test]
    fn round_robin_starts_after_server_zero() {
        let rr = RoundRobin::new();
        assert_eq!(picks(&rr, &ups(3), 4), [Some(1), Some(2), Some(0), Some(1)]);
    }

    #[test]
    fn round_robin_skips_blacklisted_and_unusable() {
        let rr = RoundRobin::new();
        let unusable = Candidate::default();
        let servers = [up(), down(), unusable, up()];
        assert_eq!(picks(&rr, &servers, 3), [Some(3), Some(0), Some(3)]);
    }

    #[test]
    fn round_robin_returns_to_the_last_pick_when_only_it_is_left() {
        let rr = RoundRobin::new();
        assert_eq!(picks(&rr, &[up(), down()], 2), [Some(0), Some(0)]);
    }

    #[test]
    fn round_robin_with_nothing_available_is_none_and_keeps_the_cursor() {
        let rr = RoundRobin::new();
        assert_eq!(picks(&rr, &[down(), down(), down()], 2), [None, None]);
        assert_eq!(picks(&rr, &ups(3), 1), [Some(1)]);
        assert_eq!(picks(&rr, &[], 1), [None]);
    }

    #[test]
    fn round_robin_survives_a_shrunk_server_list() {
        let rr = RoundRobin::new();
        assert_eq!(picks(&rr, &ups(5), 4), [Some(1), Some(2), Some(3), Some(4)]);
        assert_eq!(picks(&rr, &ups(2), 2), [Some(1), Some(0)]);
    }

    #[test]
    fn round_robin_is_balanced_across_threads() {
        const PER_THREAD: usize = 10_000;
        let rr = Arc::new(RoundRobin::new());
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let rr = Arc::clone(&rr);
                std::thread::spawn(move || {
                    let mut counts = [0usize; 4];
                    for _ in 0..PER_THREAD {
                        counts[rr.next(4, |_| true).unwrap()] += 1;
                    }
                    counts
                })
            })
            .collect();
        let mut total = [0usize; 4];
        for t in threads {
            for (sum, n) in total.iter_mut().zip(t.join().unwrap()) {
                *sum += n;
            }
        }
        // Every successful swap advances by exactly one, as if sequential.
        assert_eq!(total, [2 * PER_THREAD / 4; 4]);
    }

    #[test]
    fn tracking_returns_the_tracked_server_even_if_blacklisted() {
        let rr = RoundRobin::new();
        let servers = [up(), up(), down()];
        assert_eq!(
            first_choice(&mode(), &servers[..], v4(1), 0, Some(2), &rr),
            Some(2)
        );
        // The cursor did not move.
        assert_eq!(picks(&rr, &servers, 1), [Some(1)]);
    }

    #[test]
    fn tracking_ignores_a_server_beyond_the_list() {
        let rr = RoundRobin::new();
        assert_eq!(
            first_choice(&mode(), &ups(3)[..], v4(1), 0, Some(7), &rr),
            Some(1)
        );
    }

    #[test]
    fn roundrobin_flag_ignores_tracking() {
        let rr = RoundRobin::new();
        assert_eq!(
            first_choice(&rr_mode(), &ups(3)[..], v4(1), 0, Some(2), &rr),
            Some(1)
        );
    }

    #[test]
    fn tracking_takes_precedence_over_every_policy() {
        let rr = RoundRobin::new();
        for m in [
            Mode { prio: true, ..mode() },
            Mode {
                weight: true,
                ..mode()
            },
            Mode { hash: true, ..mode() },
        ] {
            assert_eq!(first_choice(&m, &ups(3)[..], v4(2), 0, Some(1), &rr), Some(1));
        }
    }

    #[test]
    fn prio_picks_the_lowest_value_ties_to_the_lowest_index() {
        let rr = RoundRobin::new();
        let prio = |p| Candidate { prio: p, ..up() };
        let m = Mode {
            prio: true,
            ..rr_mode()
        };
        let servers = [
            prio(5),
            prio(2),
            Candidate {
                blacklisted: true,
                ..prio(1)
            },
            prio(2),
        ];
        assert_eq!(first_choice(&m, &servers[..], v4(1), 0, None, &rr), Some(1));
        assert_eq!(first_choice(&m, &[down(), down()][..], v4(1), 0, None, &rr), None);
    }

    #[test]
    fn prio_wins_over_weight_and_hash() {
        let rr = RoundRobin::new();
        let m = Mode {
            prio: true,
            weight: true,
            hash: true,
            ..rr_mode()
        };
        let servers = [
            Candidate {
                prio: 3,
                weight: 1,
                ..up()
            },
            Candidate { prio: 1, ..up() },
        ];
        assert_eq!(first_choice(&m, &servers[..], v4(2), 0, None, &rr), Some(1));
    }

    #[test]
    fn weight_is_least_connections_scaled_by_weight() {
        let rr = RoundRobin::new();
        let m = Mode {
            weight: true,
            ..rr_mode()
        };
        let s = |conns, weight| Candidate {
            conns,
            weight,
            ..up()
        };
        // Loads: 256*3/100 = 7, 256*5/200 = 6, 256*1/10 = 25.
        assert_eq!(
            first_choice(&m, &[s(3, 100), s(5, 200), s(1, 10)][..], v4(1), 0, None, &rr),
            Some(1)
        );
        // 256*1/100 = 2 and 256*1/90 = 2: integer division ties, lowest index wins.
        assert_eq!(
            first_choice(&m, &[s(1, 100), s(1, 90)][..], v4(1), 0, None, &rr),
            Some(0)
        );
        // Blacklisted servers are skipped however idle.
        let servers = [
            Candidate {
                blacklisted: true,
                ..s(0, 100)
            },
            s(9, 100),
        ];
        assert_eq!(first_choice(&m, &servers[..], v4(1), 0, None, &rr), Some(1));
    }

    #[test]
    fn weight_zero_is_never_the_first_choice() {
        let rr = RoundRobin::new();
        let m = Mode {
            weight: true,
            ..rr_mode()
        };
        let s = |conns, weight| Candidate {
            conns,
            weight,
            ..up()
        };
        assert_eq!(
            first_choice(&m, &[s(0, 0), s(50, 1)][..], v4(1), 0, None, &rr),
            Some(1)
        );
        assert_eq!(
            first_choice(&m, &[s(0, 0), s(0, 0)][..], v4(1), 0, None, &rr),
            None
        );
    }

    #[test]
    fn hash_matches_debian_pen() {
        let rr = RoundRobin::new();
        let m = Mode {
            hash: true,
            ..rr_mode()
        };
        let choose = |key| first_choice(&m, &ups(3)[..], key, 0, None, &rr);
        if cfg!(target_endian = "little") {
            assert_eq!(
                [choose(v4(2)), choose(v4(3)), choose(v4(4))],
                [Some(0), Some(1), Some(2)]
            );
        }
        // Stable per address, whatever the port (the key has none).
        assert_eq!(choose(v4(9)), choose(v4(9)));
    }

    #[test]
    fn hash_mixes_in_the_ipv4_port_without_tracking_like_pen() {
        let rr = RoundRobin::new();
        let no_tracking = Mode {
            hash: true,
            roundrobin: true,
            ..Mode::default()
        };
        let tracking = Mode {
            hash: true,
            ..Mode::default()
        };
        let choose = |m: &Mode, key, port| first_choice(m, &ups(3)[..], key, port, None, &rr);
        if cfg!(target_endian = "little") {
            // Observed with Debian's pen -r -h from fixed source ports.
            let seen: Vec<_> = (40000..40003).map(|p| choose(&no_tracking, v4(2), p)).collect();
            assert_eq!(seen, [Some(2), Some(0), Some(1)]);
            assert_eq!(choose(&no_tracking, v4(3), 40000), Some(0));
        }
        assert_eq!(choose(&tracking, v4(2), 40000), choose(&tracking, v4(2), 40001));
        let v6 = ClientKey::Ip("::1".parse().unwrap());
        assert_eq!(choose(&no_tracking, v6, 40000), choose(&no_tracking, v6, 40001));
    }

    #[test]
    fn hash_uses_the_last_ipv6_octet_and_zero_for_unix() {
        let rr = RoundRobin::new();
        let m = Mode {
            hash: true,
            ..rr_mode()
        };
        let choose = |key| first_choice(&m, &ups(3)[..], key, 0, None, &rr);
        let v6 = |last| ClientKey::Ip(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, last)));
        assert_eq!(choose(v6(0x1204)), Some(4 % 3));
        assert_eq!(choose(v6(0x0005)), Some(5 % 3));
        assert_eq!(choose(ClientKey::Unix), Some(0));
        assert_eq!(first_choice(&m, &ups(0)[..], v4(2), 0, None, &rr), None);
    }

    #[test]
    fn hash_does_not_check_availability() {
        let rr = RoundRobin::new();
        let m = Mode {
            hash: true,
            ..rr_mode()
        };
        let servers = [down(), down(), down()];
        assert_eq!(
            first_choice(&m, &servers[..], ClientKey::Unix, 0, None, &rr),
            Some(0)
        );
    }

    #[test]
    fn limits() {
        let s = |conns, max, hard| Candidate {
            conns,
            max,
            hard,
            ..up()
        };
        // max 0: no limit, hard ignored.
        assert_eq!(conn_limit(&s(1000, 0, 5), true), None);
        assert!(admissible(&s(1000, 0, 5), false));
        // Soft limit for everyone.
        assert_eq!(conn_limit(&s(0, 10, 20), false), Some(10));
        assert!(admissible(&s(9, 10, 20), false));
        assert!(!admissible(&s(10, 10, 20), false));
        // Tracked clients may go up to hard.
        assert_eq!(conn_limit(&s(0, 10, 20), true), Some(20));
        assert!(admissible(&s(19, 10, 20), true));
        assert!(!admissible(&s(20, 10, 20), true));
        // hard <= max caps tracked clients at max too.
        assert_eq!(conn_limit(&s(0, 10, 5), true), Some(10));
        assert_eq!(conn_limit(&s(0, 10, 10), true), Some(10));
        assert!(!admissible(&s(10, 10, 0), true));
    }

    #[test]
    fn admissible_needs_usable_and_not_blacklisted() {
        assert!(admissible(&up(), false));
        assert!(!admissible(&down(), true));
        assert!(!admissible(&Candidate::default(), true));
    }

    #[test]
    fn first_attempt_is_the_first_choice_with_its_limit() {
        let servers = [
            up(),
            Candidate {
                max: 2,
                hard: 4,
                ..up()
            },
        ];
        let mut a = Attempts::new(Some(1));
        let choice = a.next(&mode(), &servers[..], Some(1), None);
        assert_eq!(
            choice,
            Some(Choice {
                target: Target::Server(1),
                limit: Some(4)
            })
        );
        assert_eq!(a.last(), Some(Target::Server(1)));
        let mut a = Attempts::new(Some(1));
        let choice = a.next(&mode(), &servers[..], None, None);
        assert_eq!(choice.map(|c| c.limit), Some(Some(2)));
    }

    #[test]
    fn failover_goes_round_and_retries_the_initial_server_last() {
        let mut a = Attempts::new(Some(2));
        let got = drain(&mut a, &mode(), &ups(4), None, None);
        let want = [2, 3, 0, 1, 2].map(Target::Server);
        assert_eq!(got, want);
        assert_eq!(a.last(), Some(Target::Server(2)));
    }

    #[test]
    fn failover_skips_inadmissible_servers_and_resumes_with_live_state() {
        let full = Candidate {
            conns: 3,
            max: 3,
            ..up()
        };
        let mut servers = vec![up(), down(), full, up()];
        let mut a = Attempts::new(Some(0));
        let m = mode();
        assert_eq!(
            a.next(&m, &servers, None, None).map(|c| c.target),
            Some(Target::Server(0))
        );
        // Server 0 refused the connect and got blacklisted.
        servers[0] = down();
        assert_eq!(
            a.next(&m, &servers, None, None).map(|c| c.target),
            Some(Target::Server(3))
        );
        assert_eq!(a.next(&m, &servers, None, None), None);
    }

    #[test]
    fn an_inadmissible_first_choice_fails_over_at_once() {
        let mut a = Attempts::new(Some(1));
        let got = drain(&mut a, &mode(), &[up(), down(), up()], Some(1), None);
        assert_eq!(got, [2, 0].map(Target::Server));
    }

    #[test]
    fn a_full_server_admits_its_tracked_client_up_to_hard() {
        let s = Candidate {
            conns: 5,
            max: 5,
            hard: 6,
            ..up()
        };
        let mut a = Attempts::new(Some(0));
        let got = drain(&mut a, &mode(), &[s, up()], Some(0), None);
        assert_eq!(got, [0, 1, 0].map(Target::Server));
        let mut a = Attempts::new(Some(0));
        let got = drain(&mut a, &mode(), &[s, up()], None, None);
        assert_eq!(got, [1].map(Target::Server));
    }

    #[test]
    fn stubborn_never_fails_over() {
        let m = Mode {
            stubborn: true,
            ..mode()
        };
        let mut a = Attempts::new(Some(1));
        assert_eq!(drain(&mut a, &m, &ups(3), None, Some(up())), [Target::Server(1)]);
        let mut a = Attempts::new(Some(1));
        assert_eq!(drain(&mut a, &m, &[up(), down()], None, Some(up())), []);
        let mut a = Attempts::new(None);
        assert_eq!(drain(&mut a, &m, &ups(2), None, Some(up())), []);
    }

    #[test]
    fn emergency_comes_once_after_every_regular_server() {
        let mut a = Attempts::new(Some(0));
        let got = drain(&mut a, &mode(), &[up(), down()], None, Some(up()));
        assert_eq!(got, [Target::Server(0), Target::Server(0), Target::Emergency]);
        assert_eq!(a.last(), Some(Target::Emergency));
        assert_eq!(a.next(&mode(), &ups(2)[..], None, Some(up())), None);
    }

    #[test]
    fn the_abuse_server_is_offered_only_when_it_can_take_the_client() {
        let offered = |c: Candidate| abuse_choice(Some(c)).map(|choice| choice.limit);
        assert_eq!(offered(up()), Some(None));
        assert_eq!(
            offered(Candidate { denied: true, ..up() }),
            Some(None),
            "its own list is not checked"
        );
        assert_eq!(
            offered(Candidate {
                max: 3,
                hard: 9,
                conns: 2,
                ..up()
            }),
            Some(Some(3))
        );
        assert_eq!(
            offered(Candidate {
                max: 3,
                conns: 3,
                ..up()
            }),
            None
        );
        assert_eq!(
            offered(Candidate {
                blacklisted: true,
                ..up()
            }),
            None
        );
        assert_eq!(offered(Candidate::default()), None, "not usable");
        assert_eq!(abuse_choice(None), None);
    }

    #[test]
    fn emergency_limit_ignores_tracking() {
        let e = Candidate {
            conns: 0,
            max: 1,
            hard: 9,
            ..up()
        };
        let mut a = Attempts::new(Some(0));
        let got = std::iter::from_fn(|| a.next(&mode(), &[down()][..], Some(0), Some(e))).collect::<Vec<_>>();
        assert_eq!(
            got,
            [Choice {
                target: Target::Emergency,
                limit: Some(1)
            }]
        );
    }

    #[test]
    fn an_inadmissible_emergency_server_is_not_offered() {
        let mut a = Attempts::new(Some(0));
        assert_eq!(drain(&mut a, &mode(), &[down()], None, Some(down())), []);
        let full = Candidate {
            conns: 1,
            max: 1,
            ..up()
        };
        let mut a = Attempts::new(Some(0));
        assert_eq!(drain(&mut a, &mode(), &[down()], None, Some(full)), []);
    }

    #[test]
    fn no_first_choice_scans_every_server_from_zero() {
        let mut a = Attempts::new(None);
        let got = drain(&mut a, &mode(), &ups(3), None, Some(up()));
        assert_eq!(
            got,
            [
                Target::Server(0),
                Target::Server(1),
                Target::Server(2),
                Target::Emergency
            ]
        );
        // -W with every weight 0: no first choice, yet the servers are tried.
        let m = Mode {
            weight: true,
            ..rr_mode()
        };
        let rr = RoundRobin::new();
        let first = first_choice(&m, &ups(2)[..], v4(1), 0, None, &rr);
        let mut a = Attempts::new(first);
        assert_eq!(drain(&mut a, &m, &ups(2), None, None), [0, 1].map(Target::Server));
    }

    #[test]
    fn no_servers_at_all_goes_to_emergency() {
        let mut a = Attempts::new(None);
        assert_eq!(drain(&mut a, &mode(), &[], None, Some(up())), [Target::Emergency]);
        let mut a = Attempts::new(Some(3));
        assert_eq!(drain(&mut a, &mode(), &[], None, None), []);
    }

    #[test]
    fn a_first_choice_beyond_a_shrunk_list_scans_from_zero() {
        let mut a = Attempts::new(Some(5));
        assert_eq!(
            drain(&mut a, &mode(), &ups(2), None, None),
            [0, 1].map(Target::Server)
        );
    }
}
