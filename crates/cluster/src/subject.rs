//! MQTT topics and filters as NATS subjects.
//!
//! Every MQTT level becomes one NATS token, escaped so that any level (empty, with dots,
//! spaces, `*`, `>` or non-ASCII bytes) is a valid token and two different levels never give
//! the same token. Letters, digits and `-` stay as they are; every other byte becomes `_`
//! followed by two upper-case hex digits; an empty level becomes `_`. A filter's `+` becomes
//! the NATS wildcard `*`, and a trailing `#` becomes `>` plus, because MQTT's `a/#` also
//! matches `a` itself, the subject of the parent level.
//!
//! NATS only narrows where a message travels; the receiving node still matches it against its
//! own topic tree, so MQTT rules NATS does not know (topics starting with `$` are not matched
//! by a leading wildcard) hold all the same.
//!
//! Topics of a tenant agent (`t/{tenant}/agents/{id}/...`, "agent topics") travel under
//! `{cluster}.a.{node}`, where `{node}` is the node that holds the agent as the sending node's
//! directory knows it (`_` when none): the node subscribes to `{cluster}.a.{node}.>` once for
//! all its agents, instead of one NATS subscription per agent, and wildcard subscribers (a
//! console's `t/{tenant}/agents/+/ack`) subscribe with `*` in the node's place. Every other
//! topic travels under `{cluster}.m`.

use std::fmt::Write;

/// The subject prefix of application messages routed by interest: `{cluster}.m`.
pub fn message_prefix(cluster: &str) -> String {
    format!("{cluster}.m")
}

/// The subject prefix of agent topics: `{cluster}.a`.
pub fn agent_prefix(cluster: &str) -> String {
    format!("{cluster}.a")
}

/// The node token of agent topics whose agent no node is known to hold.
const NO_NODE: &str = "_";

/// The subject this node subscribes to for the agent topics of every agent it holds.
pub fn node_subject(cluster: &str, node: &str) -> String {
    let mut out = agent_prefix(cluster);
    out.push('.');
    push_level(&mut out, node);
    out.push_str(".>");
    out
}

/// The subject on which node `node` receives receipts ([`crate::Receipt`]) for the messages
/// it sent to other nodes' agents.
pub fn receipt_subject(cluster: &str, node: &str) -> String {
    let mut out = format!("{cluster}.done.");
    push_level(&mut out, node);
    out
}

/// The agent an agent topic belongs to, as `t/{tenant}/agents/{id}` (a prefix of the topic);
/// `None` for any other topic.
pub fn agent_of(topic: &str) -> Option<&str> {
    let mut levels = topic.match_indices('/').map(|(i, _)| i);
    let (_, second, third) = (levels.next()?, levels.next()?, levels.next()?);
    let end = levels.next().unwrap_or(topic.len());
    (topic.starts_with("t/") && &topic[second..third] == "/agents").then(|| &topic[..end])
}

/// The NATS subject of a message published to `topic`: under `{cluster}.a.{node}` for an
/// agent topic (`holder` is the node the directory names, if any), else `{cluster}.m`.
pub fn routed_subject(cluster: &str, topic: &str, holder: Option<&str>) -> String {
    if agent_of(topic).is_none() {
        return topic_subject(&message_prefix(cluster), topic);
    }
    let mut prefix = agent_prefix(cluster);
    prefix.push('.');
    match holder {
        Some(node) => push_level(&mut prefix, node),
        None => prefix.push_str(NO_NODE),
    }
    topic_subject(&prefix, topic)
}

/// The NATS subjects a node subscribes to for the MQTT filter `filter` (no `$share/` prefix):
/// those of the agent topics it can match (any node), and of the other topics it can match.
/// Empty for an invalid filter.
pub fn routed_filter_subjects(cluster: &str, filter: &str) -> Vec<String> {
    let levels: Vec<&str> = filter.split('/').collect();
    let mut subjects = Vec::new();
    if may_match_other(&levels) {
        subjects = filter_subjects(&message_prefix(cluster), filter);
    }
    if may_match_agent(&levels) {
        let prefix = format!("{}.*", agent_prefix(cluster));
        // An agent topic has at least four levels: `t/x/agents/#` also matches `t/x/agents`,
        // which is not one, so that parent subject would carry nothing.
        let tokens = |s: &str| s.split('.').count() - prefix.split('.').count();
        subjects.extend(
            filter_subjects(&prefix, filter)
                .into_iter()
                .filter(|s| s.ends_with(".>") || tokens(s) >= 4),
        );
    }
    subjects
}

/// Whether a filter can match an agent topic (`t/+/agents/+/...`, four levels or more).
fn may_match_agent(levels: &[&str]) -> bool {
    for (i, level) in levels.iter().enumerate() {
        match (i, *level) {
            (_, "#") => return true,
            (3, _) => return true,
            (0, l) if l != "t" && l != "+" => return false,
            (2, l) if l != "agents" && l != "+" => return false,
            _ => {}
        }
    }
    false
}

/// Whether a filter can match a topic that is not an agent topic.
fn may_match_other(levels: &[&str]) -> bool {
    let agent_only = levels.len() >= 4
        && levels[0] == "t"
        && levels[2] == "agents"
        && !levels[..4].contains(&"#");
    !agent_only
}

fn push_level(out: &mut String, level: &str) {
    if level.is_empty() {
        out.push('_');
        return;
    }
    for b in level.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "_{b:02X}");
        }
    }
}

/// The NATS queue group of the shared subscription `share` (`$share/{group}/{filter}`): the
/// same on every node, so that NATS gives each message to one node per group.
pub fn share_queue(cluster: &str, share: &str) -> String {
    topic_subject(&format!("{cluster}.q"), share)
}

/// The NATS subject that carries messages published to `topic` (an MQTT topic name).
pub fn topic_subject(prefix: &str, topic: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + topic.len() + 8);
    out.push_str(prefix);
    for level in topic.split('/') {
        out.push('.');
        push_level(&mut out, level);
    }
    out
}

/// The NATS subjects a node subscribes to for the MQTT filter `filter` (without any
/// `$share/{group}/` prefix): one subject, or two for a filter ending in `#` (the wildcard and
/// the parent level, which `#` also matches). Empty for an invalid filter.
pub fn filter_subjects(prefix: &str, filter: &str) -> Vec<String> {
    let levels: Vec<&str> = filter.split('/').collect();
    let mut out = String::with_capacity(prefix.len() + filter.len() + 8);
    out.push_str(prefix);
    for (i, level) in levels.iter().enumerate() {
        match *level {
            "#" if i + 1 == levels.len() => {
                let parent = (i > 0).then(|| out.clone());
                out.push_str(".>");
                return match parent {
                    Some(parent) => vec![out, parent],
                    None => vec![out],
                };
            }
            "+" => out.push_str(".*"),
            l if l.contains(['#', '+']) => return Vec::new(),
            l => {
                out.push('.');
                push_level(&mut out, l);
            }
        }
    }
    vec![out]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// NATS subject matching, as the server does it (tokens split on `.`).
    fn nats_matches(subject_filter: &str, subject: &str) -> bool {
        let f: Vec<&str> = subject_filter.split('.').collect();
        let s: Vec<&str> = subject.split('.').collect();
        for (i, token) in f.iter().enumerate() {
            match *token {
                ">" => return s.len() > i,
                "*" if i < s.len() => {}
                t if i < s.len() && s[i] == t => {}
                _ => return false,
            }
        }
        f.len() == s.len()
    }

    /// MQTT matching without the `$` rule (the node's topic tree applies that).
    fn mqtt_matches(filter: &str, topic: &str) -> bool {
        let f: Vec<&str> = filter.split('/').collect();
        let t: Vec<&str> = topic.split('/').collect();
        for (i, level) in f.iter().enumerate() {
            match *level {
                "#" => return true,
                "+" if i < t.len() => {}
                l if i < t.len() && t[i] == l => {}
                _ => return false,
            }
        }
        f.len() == t.len()
    }

    #[test]
    fn levels_are_escaped_into_valid_tokens() {
        assert_eq!(
            topic_subject("b.m", "t/acme/agents/pc-1/wake"),
            "b.m.t.acme.agents.pc-1.wake"
        );
        assert_eq!(
            topic_subject("b.m", "a.b/ /*/>/_"),
            "b.m.a_2Eb._20._2A._3E._5F"
        );
        assert_eq!(topic_subject("b.m", "/x//"), "b.m._.x._._");
        assert_eq!(topic_subject("b.m", "é"), "b.m._C3_A9");
    }

    #[test]
    fn filters_become_nats_wildcards() {
        assert_eq!(
            filter_subjects("b.m", "t/acme/agents/+/wake"),
            ["b.m.t.acme.agents.*.wake"]
        );
        assert_eq!(
            filter_subjects("b.m", "t/acme/#"),
            ["b.m.t.acme.>", "b.m.t.acme"]
        );
        assert_eq!(filter_subjects("b.m", "#"), ["b.m.>"]);
        assert!(filter_subjects("b.m", "a/#/b").is_empty());
        assert!(filter_subjects("b.m", "a/b+").is_empty());
    }

    /// Levels that make agent topics likely.
    fn agent_level() -> BoxedStrategy<String> {
        prop_oneof![Just("t".to_owned()), Just("agents".to_owned()), level()].boxed()
    }

    #[test]
    fn agent_topics_are_told_apart() {
        assert_eq!(
            agent_of("t/acme/agents/pc-1/wake"),
            Some("t/acme/agents/pc-1")
        );
        assert_eq!(agent_of("t/acme/agents/pc-1"), Some("t/acme/agents/pc-1"));
        assert_eq!(
            agent_of("t/acme/agents/pc-1/a/b"),
            Some("t/acme/agents/pc-1")
        );
        assert_eq!(agent_of("t/acme/agents"), None);
        assert_eq!(agent_of("t/acme/servers/s1/presence"), None);
        assert_eq!(agent_of("anon/agents/pc-1/wake"), None);
        assert_eq!(agent_of("u/acme/agents/pc-1/wake"), None);
        assert_eq!(
            routed_subject("b", "t/acme/agents/pc-1/wake", Some("n1")),
            "b.a.n1.t.acme.agents.pc-1.wake"
        );
        assert_eq!(
            routed_subject("b", "t/acme/agents/pc-1/wake", None),
            "b.a._.t.acme.agents.pc-1.wake"
        );
        assert_eq!(routed_subject("b", "anon/x", Some("n1")), "b.m.anon.x");
        assert_eq!(node_subject("b", "n.1"), "b.a.n_2E1.>");
    }

    #[test]
    fn wildcard_filters_over_agent_topics_take_any_node() {
        assert_eq!(
            routed_filter_subjects("b", "t/acme/agents/+/ack"),
            ["b.a.*.t.acme.agents.*.ack"]
        );
        assert_eq!(
            routed_filter_subjects("b", "t/acme/agents/#"),
            [
                "b.m.t.acme.agents.>",
                "b.m.t.acme.agents",
                "b.a.*.t.acme.agents.>"
            ]
        );
        assert_eq!(routed_filter_subjects("b", "#"), ["b.m.>", "b.a.*.>"]);
        assert_eq!(
            routed_filter_subjects("b", "t/acme/servers/+/presence"),
            ["b.m.t.acme.servers.*.presence"]
        );
        assert!(routed_filter_subjects("b", "a/#/b").is_empty());
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![Just(String::new()), "[a-c]{1,2}", "[a.* >_-]{1,3}",]
    }

    proptest! {
        /// A topic's subject matches a filter's subjects exactly when the topic matches the
        /// filter in MQTT: interest routing neither loses nor invents deliveries.
        #[test]
        fn nats_routing_agrees_with_mqtt_matching(
            topic in prop::collection::vec(level(), 1..5),
            filter in prop::collection::vec(prop_oneof![level(), Just("+".to_owned())], 1..5),
            hash in any::<bool>(),
        ) {
            let topic = topic.join("/");
            let mut filter = filter.join("/");
            if hash {
                filter.push_str("/#");
            }
            let subject = topic_subject("p", &topic);
            let routed = filter_subjects("p", &filter).iter().any(|f| nats_matches(f, &subject));
            prop_assert_eq!(routed, mqtt_matches(&filter, &topic), "filter {} topic {}", filter, topic);
        }

        /// The same with agent topics in play: a message on an agent topic reaches a wildcard
        /// subscriber whichever node holds the agent, and the holder's node subscription
        /// exactly when the topic is one of its agent's.
        #[test]
        fn routing_with_agent_topics_agrees_with_mqtt_matching(
            topic in prop::collection::vec(agent_level(), 1..6),
            filter in prop::collection::vec(prop_oneof![agent_level(), Just("+".to_owned())], 1..6),
            hash in any::<bool>(),
            holder in prop_oneof![Just(None), Just(Some("n1")), Just(Some("n.2"))],
        ) {
            let topic = topic.join("/");
            let mut filter = filter.join("/");
            if hash {
                filter.push_str("/#");
            }
            let subject = routed_subject("c", &topic, holder);
            let routed = routed_filter_subjects("c", &filter).iter().any(|f| nats_matches(f, &subject));
            prop_assert_eq!(routed, mqtt_matches(&filter, &topic), "filter {} topic {}", filter, topic);
            for node in ["n1", "n.2"] {
                let to_node = nats_matches(&node_subject("c", node), &subject);
                prop_assert_eq!(to_node, agent_of(&topic).is_some() && holder == Some(node));
            }
        }

        /// Different topics never share a subject.
        #[test]
        fn escaping_is_injective(a in prop::collection::vec(level(), 1..4), b in prop::collection::vec(level(), 1..4)) {
            let (a, b) = (a.join("/"), b.join("/"));
            prop_assert_eq!(topic_subject("p", &a) == topic_subject("p", &b), a == b);
        }
    }
}
