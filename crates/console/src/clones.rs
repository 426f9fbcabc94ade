//! Cloned identities: one agent identity on two machines (a copied state folder or disk
//! image). The two agents take the push session from each other, and each one that was taken
//! over checks in at once with its machine's inventory, so the console sees two machines
//! check in by turns. [`judge_checkin`] tells that apart from a machine that merely changed
//! (a new network card, a new host name): the console flags a clone only when a check-in
//! made right after a takeover brings back the machine that was replaced shortly before.

use crate::model::{Inventory, Millis};

/// How soon the machine replaced last must come back to count as a clone.
pub const CLONE_WINDOW_MS: Millis = 60 * 60 * 1000;

/// What the operator does about a cloned identity.
pub const CLONE_FIX: &str = "Two machines use this agent's identity (a copied state folder or disk image); each keeps taking the push session from the other and the agents stop fighting for an hour at a time. On one of the machines run `beckon agent enroll --force` with a new enrollment token to give it an identity of its own, restart its agent, then clear this flag.";

/// What the console keeps about an agent's machine between check-ins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineHistory {
    /// The machine reported before the last change.
    pub previous: Option<Inventory>,
    /// When the machine last changed.
    pub changed_at: Option<Millis>,
}

/// What a check-in says about the machine behind the identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckinVerdict {
    /// The same machine (addresses may have moved).
    SameMachine,
    /// Another machine than last time: the recorded one becomes the previous one.
    MachineChanged,
    /// Two machines check in by turns, taking the session from each other.
    Cloned,
}

/// Whether two inventories describe one machine: host name, operating system and network
/// cards. Addresses are left out; they change as a machine moves between networks.
pub fn same_machine(a: &Inventory, b: &Inventory) -> bool {
    let macs = |i: &Inventory| {
        let mut m: Vec<String> = i.macs.iter().map(|m| m.to_ascii_lowercase()).collect();
        m.sort();
        m.dedup();
        m
    };
    a.hostname.eq_ignore_ascii_case(&b.hostname) && a.os == b.os && macs(a) == macs(b)
}

/// Judges a check-in that reports `incoming` while `current` is recorded. `taken_over`: the
/// agent checks in because its session was just taken over by another connection with its
/// id.
pub fn judge_checkin(
    current: &Inventory,
    history: &MachineHistory,
    incoming: &Inventory,
    taken_over: bool,
    now: Millis,
) -> CheckinVerdict {
    if same_machine(current, incoming) {
        return CheckinVerdict::SameMachine;
    }
    let came_back = history
        .previous
        .as_ref()
        .is_some_and(|p| same_machine(p, incoming));
    let recently = history
        .changed_at
        .is_some_and(|at| now.saturating_sub(at) <= CLONE_WINDOW_MS);
    if taken_over && came_back && recently {
        CheckinVerdict::Cloned
    } else {
        CheckinVerdict::MachineChanged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(hostname: &str, mac: &str) -> Inventory {
        Inventory {
            hostname: hostname.into(),
            os: "Debian GNU/Linux 13 (trixie)".into(),
            addresses: Vec::new(),
            macs: vec![mac.into()],
        }
    }

    /// Feeds check-ins through the judge the way the store does; returns the verdicts.
    fn run(start: Inventory, checkins: &[(Inventory, bool, Millis)]) -> Vec<CheckinVerdict> {
        let mut current = start;
        let mut history = MachineHistory::default();
        let mut verdicts = Vec::new();
        for (incoming, taken_over, at) in checkins {
            let verdict = judge_checkin(&current, &history, incoming, *taken_over, *at);
            if verdict != CheckinVerdict::SameMachine {
                history = MachineHistory {
                    previous: Some(std::mem::replace(&mut current, incoming.clone())),
                    changed_at: Some(*at),
                };
            }
            verdicts.push(verdict);
        }
        verdicts
    }

    #[test]
    fn two_machines_taking_turns_after_takeovers_are_a_clone() {
        let (a, b) = (
            machine("pc-a", "02:00:00:00:00:0a"),
            machine("pc-b", "02:00:00:00:00:0b"),
        );
        let verdicts = run(
            a.clone(),
            &[
                (b.clone(), true, 1_000),
                (a.clone(), true, 3_000),
                (b.clone(), true, 5_000),
            ],
        );
        use CheckinVerdict::*;
        assert_eq!(verdicts, [MachineChanged, Cloned, Cloned]);
    }

    #[test]
    fn a_machine_that_changes_back_without_takeovers_is_no_clone() {
        // A laptop docked and undocked: its network cards come and go, nobody is taken over.
        let undocked = machine("laptop", "02:00:00:00:00:01");
        let mut docked = undocked.clone();
        docked.macs.push("02:00:00:00:00:02".into());
        let verdicts = run(
            undocked.clone(),
            &[
                (docked.clone(), false, 1_000),
                (undocked.clone(), false, 2_000),
                (docked, false, 3_000),
            ],
        );
        assert!(
            verdicts
                .iter()
                .all(|v| *v == CheckinVerdict::MachineChanged)
        );
    }

    #[test]
    fn a_machine_coming_back_after_the_window_is_no_clone() {
        let (a, b) = (
            machine("pc-a", "02:00:00:00:00:0a"),
            machine("pc-b", "02:00:00:00:00:0b"),
        );
        let verdicts = run(
            a.clone(),
            &[(b, true, 1_000), (a, true, 1_000 + CLONE_WINDOW_MS + 1)],
        );
        assert_eq!(verdicts, [CheckinVerdict::MachineChanged; 2]);
    }

    #[test]
    fn moving_addresses_and_case_do_not_make_another_machine() {
        let a = machine("PC-A", "02:00:00:00:00:0A");
        let mut moved = machine("pc-a", "02:00:00:00:00:0a");
        moved.addresses.push(crate::model::AgentAddress {
            address: "10.1.2.3".parse().unwrap(),
            prefix_len: 24,
        });
        assert!(same_machine(&a, &moved));
        assert_eq!(
            judge_checkin(&a, &MachineHistory::default(), &moved, true, 0),
            CheckinVerdict::SameMachine
        );
    }
}
