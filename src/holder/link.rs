//! The line protocol between the lock holder and the drain worker, over a socket pair the holder
//! makes. The holder parses only three fixed words from the worker, so nothing the worker learnt
//! from the cluster reaches the privileged side as data.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, UNIX_EPOCH};

use crate::drain::keeper::Tell;
use crate::drain::model::Schedule;

/// The file descriptor number the worker finds the link at, and the kubeconfig's (when the
/// holder hands one over: the worker may not be allowed to read the file itself).
pub const LINK_FD: i32 = 3;
pub const KUBECONFIG_FD: i32 = 4;

/// Holder → worker: the keeper's [`Tell`], as a line.
pub type ToWorker = Tell;

/// Worker → holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToHolder {
    Alive,
    Release,
    Retake,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unreadable line from the {from}: {line:?}")]
pub struct LinkError {
    pub from: &'static str,
    pub line: String,
}

/// A shutdown type as one word: logind's are (`poweroff`, `reboot`, …); `-` for none.
fn word(kind: &Option<String>) -> String {
    match kind {
        Some(k) if !k.is_empty() => k
            .chars()
            .map(|c| if c.is_ascii_graphic() { c } else { '_' })
            .collect(),
        _ => "-".into(),
    }
}

fn kind_of(w: &str) -> Option<String> {
    (w != "-").then(|| w.to_string())
}

impl fmt::Display for Tell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: &Duration| d.as_millis();
        match self {
            Tell::Lock {
                delay_max,
                preparing,
            } => write!(f, "lock {} {}", ms(delay_max), u8::from(*preparing)),
            Tell::Lost => f.write_str("lost"),
            Tell::NoLock { delay_max } => write!(f, "nolock {}", ms(delay_max)),
            Tell::Delay(d) => write!(f, "delay {}", ms(d)),
            Tell::Shutdown { start, kind } => {
                write!(f, "shutdown {} {}", u8::from(*start), word(kind))
            }
            Tell::Resume { kind, elapsed } => {
                write!(f, "resume {} {}", word(kind), ms(elapsed))
            }
            Tell::Schedule(None) => f.write_str("schedule -"),
            Tell::Schedule(Some(s)) => write!(
                f,
                "schedule {} {}",
                word(&Some(s.kind.clone())),
                ms(&s.at.duration_since(UNIX_EPOCH).unwrap_or_default())
            ),
        }
    }
}

impl FromStr for Tell {
    type Err = LinkError;
    fn from_str(line: &str) -> Result<Self, LinkError> {
        let err = || LinkError {
            from: "holder",
            line: line.chars().take(200).collect(),
        };
        let ms = |w: Option<&str>| -> Result<Duration, LinkError> {
            w.and_then(|w| w.parse::<u64>().ok())
                .map(Duration::from_millis)
                .ok_or_else(err)
        };
        let flag = |w: Option<&str>| match w {
            Some("1") => Ok(true),
            Some("0") => Ok(false),
            _ => Err(err()),
        };
        let mut w = line.split_ascii_whitespace();
        let m = match w.next() {
            Some("lock") => Tell::Lock {
                delay_max: ms(w.next())?,
                preparing: flag(w.next())?,
            },
            Some("lost") => Tell::Lost,
            Some("nolock") => Tell::NoLock {
                delay_max: ms(w.next())?,
            },
            Some("delay") => Tell::Delay(ms(w.next())?),
            Some("shutdown") => Tell::Shutdown {
                start: flag(w.next())?,
                kind: kind_of(w.next().ok_or_else(err)?),
            },
            Some("resume") => {
                let kind = kind_of(w.next().ok_or_else(err)?);
                Tell::Resume {
                    kind,
                    elapsed: ms(w.next())?,
                }
            }
            Some("schedule") => match kind_of(w.next().ok_or_else(err)?) {
                None => Tell::Schedule(None),
                Some(kind) => Tell::Schedule(Some(Schedule {
                    kind,
                    at: UNIX_EPOCH + ms(w.next())?,
                })),
            },
            _ => return Err(err()),
        };
        match w.next() {
            None => Ok(m),
            Some(_) => Err(err()),
        }
    }
}

impl fmt::Display for ToHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ToHolder::Alive => "alive",
            ToHolder::Release => "release",
            ToHolder::Retake => "retake",
        })
    }
}

impl FromStr for ToHolder {
    type Err = LinkError;
    fn from_str(line: &str) -> Result<Self, LinkError> {
        match line.trim_end() {
            "alive" => Ok(ToHolder::Alive),
            "release" => Ok(ToHolder::Release),
            "retake" => Ok(ToHolder::Retake),
            other => Err(LinkError {
                from: "worker",
                line: other.chars().take(200).collect(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_reads_back_as_written() {
        let all = [
            Tell::Lock {
                delay_max: Duration::from_millis(60_000),
                preparing: true,
            },
            Tell::Lost,
            Tell::NoLock {
                delay_max: Duration::from_secs(5),
            },
            Tell::Delay(Duration::from_millis(1500)),
            Tell::Shutdown {
                start: true,
                kind: Some("reboot".into()),
            },
            Tell::Shutdown {
                start: false,
                kind: None,
            },
            Tell::Resume {
                kind: None,
                elapsed: Duration::from_millis(1234),
            },
            Tell::Schedule(Some(Schedule {
                kind: "reboot".into(),
                at: UNIX_EPOCH + Duration::from_millis(1_796_031_672_262),
            })),
            Tell::Schedule(None),
        ];
        for m in all {
            assert_eq!(m.to_string().parse::<ToWorker>(), Ok(m.clone()), "{m}");
        }
        for m in [ToHolder::Alive, ToHolder::Release, ToHolder::Retake] {
            assert_eq!(m.to_string().parse::<ToHolder>(), Ok(m));
        }
    }

    #[test]
    fn a_kind_with_spaces_stays_one_word() {
        let m = Tell::Shutdown {
            start: true,
            kind: Some("soft reboot".into()),
        };
        assert_eq!(m.to_string(), "shutdown 1 soft_reboot");
    }

    #[test]
    fn the_holder_reads_nothing_but_three_words() {
        for bad in [
            "release now",
            "{\"release\":1}",
            "",
            "alive\u{0}",
            "retake retake",
        ] {
            assert!(bad.parse::<ToHolder>().is_err(), "{bad:?}");
        }
        for bad in [
            "lock",
            "lock x 1",
            "lock 1 2",
            "shutdown 1",
            "resume - -1",
            "lost x",
            "schedule",
            "schedule reboot",
            "schedule - 5",
        ] {
            assert!(bad.parse::<ToWorker>().is_err(), "{bad:?}");
        }
    }
}
