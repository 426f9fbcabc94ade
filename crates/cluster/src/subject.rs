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

use std::fmt::Write;

/// The subject prefix of application messages routed by interest: `{cluster}.m`.
pub fn message_prefix(cluster: &str) -> String {
    format!("{cluster}.m")
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

        /// Different topics never share a subject.
        #[test]
        fn escaping_is_injective(a in prop::collection::vec(level(), 1..4), b in prop::collection::vec(level(), 1..4)) {
            let (a, b) = (a.join("/"), b.join("/"));
            prop_assert_eq!(topic_subject("p", &a) == topic_subject("p", &b), a == b);
        }
    }
}
