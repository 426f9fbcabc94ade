//! Topic filters: validation, `$share/{group}/` parsing, matching, and the subscription trie.
//!
//! The trie has one node per filter level. Exact levels live in a hash map, so looking up the
//! subscribers of `agents/{id}/wake` among 100,000 such subscriptions costs a few hash lookups
//! (O(topic levels)), not a scan over subscriptions.

use std::collections::HashMap;
use std::str::Split;

use beckon_mqtt::QoS;

/// Identifies one session inside the core (never reused).
pub(crate) type SessionKey = u64;

/// One subscription as the trie stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SubEntry {
    /// The subscribing session.
    pub session: SessionKey,
    /// Granted (maximum) QoS.
    pub qos: QoS,
    /// v5 No Local: do not deliver the session's own publications.
    pub no_local: bool,
    /// v5 Retain As Published: keep the RETAIN flag of forwarded messages.
    pub retain_as_published: bool,
    /// v5 Subscription Identifier, echoed in PUBLISH.
    pub id: Option<u32>,
}

/// A SUBSCRIBE/UNSUBSCRIBE topic filter, split into its share group and the filter proper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ParsedFilter<'a> {
    /// The `{group}` of `$share/{group}/{filter}`, `None` for a normal subscription.
    pub share_group: Option<&'a str>,
    /// The filter that topics are matched against.
    pub filter: &'a str,
}

/// Parses and validates a filter as sent in SUBSCRIBE; `None` when it is not valid
/// (empty, `#` not last or not alone in its level, `+` not alone, bad share name).
pub(crate) fn parse_filter(raw: &str) -> Option<ParsedFilter<'_>> {
    let (share_group, filter) = match raw.strip_prefix("$share/") {
        Some(rest) => {
            let (group, filter) = rest.split_once('/')?;
            if group.is_empty() || group.contains(['+', '#']) {
                return None;
            }
            (Some(group), filter)
        }
        None => (None, raw),
    };
    valid_filter(filter).then_some(ParsedFilter {
        share_group,
        filter,
    })
}

/// Whether `filter` is a syntactically valid topic filter ([MQTT-4.7.1]).
pub(crate) fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        match level {
            "#" => {
                if levels.peek().is_some() {
                    return false;
                }
            }
            "+" => {}
            other => {
                if other.contains(['+', '#']) {
                    return false;
                }
            }
        }
    }
    true
}

/// Whether the topic name `topic` matches the (valid, non-shared) filter `filter`, including
/// the rule that filters starting with a wildcard do not match `$` topics ([MQTT-4.7.2-1]).
pub(crate) fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(f), Some(t)) if f == t => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Subscribers whose filter ends at one trie position.
#[derive(Debug, Default)]
struct Leaf {
    /// Normal subscriptions, one per session.
    subs: Vec<SubEntry>,
    /// Shared subscriptions on this filter, one entry per group.
    shared: Vec<SharedGroup>,
}

impl Leaf {
    fn is_empty(&self) -> bool {
        self.subs.is_empty() && self.shared.is_empty()
    }
}

/// The members of `$share/{name}/{filter}`; each message goes to one of them, round robin.
#[derive(Debug)]
struct SharedGroup {
    name: Box<str>,
    members: Vec<SubEntry>,
    next: usize,
}

impl SharedGroup {
    /// The next member, round robin, preferring those for which `online` is true.
    fn pick(&mut self, online: &dyn Fn(SessionKey) -> bool) -> Option<SubEntry> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let start = self.next % n;
        let pick = (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| online(self.members[i].session))
            .unwrap_or(start);
        self.next = (pick + 1) % n;
        Some(self.members[pick])
    }
}

/// Up to this many exact next levels are kept in a list; more go in a hash map.
const FEW_CHILDREN: usize = 8;

/// The exact next levels of a node. Most nodes have one (below `agents/{id}` there is only
/// `wake`), and a hash map allocates room for several entries at once, so a short list
/// holds them until there are more than [`FEW_CHILDREN`]: that is a few hundred bytes less
/// per subscribed agent.
#[derive(Debug)]
enum Children {
    Few(Vec<(Box<str>, Node)>),
    Many(HashMap<Box<str>, Node>),
}

impl Default for Children {
    fn default() -> Self {
        Self::Few(Vec::new())
    }
}

impl Children {
    fn is_empty(&self) -> bool {
        match self {
            Self::Few(list) => list.is_empty(),
            Self::Many(map) => map.is_empty(),
        }
    }

    fn get_mut(&mut self, level: &str) -> Option<&mut Node> {
        match self {
            Self::Few(list) => list
                .iter_mut()
                .find(|(name, _)| &**name == level)
                .map(|(_, node)| node),
            Self::Many(map) => map.get_mut(level),
        }
    }

    fn get_or_insert(&mut self, level: &str) -> &mut Node {
        if let Self::Few(list) = self
            && list.len() >= FEW_CHILDREN
            && !list.iter().any(|(name, _)| &**name == level)
        {
            *self = Self::Many(std::mem::take(list).into_iter().collect());
        }
        match self {
            Self::Few(list) => {
                let i = match list.iter().position(|(name, _)| &**name == level) {
                    Some(i) => i,
                    None => {
                        if list.is_empty() {
                            // Exactly one: most nodes never get a second child.
                            list.reserve_exact(1);
                        }
                        list.push((level.into(), Node::default()));
                        list.len() - 1
                    }
                };
                &mut list[i].1
            }
            Self::Many(map) => map.entry(level.into()).or_default(),
        }
    }

    fn remove(&mut self, level: &str) {
        match self {
            Self::Few(list) => {
                if let Some(i) = list.iter().position(|(name, _)| &**name == level) {
                    list.swap_remove(i);
                }
                if list.is_empty() {
                    *list = Vec::new();
                }
            }
            Self::Many(map) => {
                map.remove(level);
                if map.is_empty() {
                    // Give back the table of a level that held many clients.
                    *self = Self::default();
                }
            }
        }
    }
}

/// One level of the trie.
#[derive(Debug, Default)]
struct Node {
    /// Exact next levels.
    children: Children,
    /// The `+` next level.
    plus: Option<Box<Node>>,
    /// Filters that end here.
    exact: Option<Box<Leaf>>,
    /// Filters that end here with `/#` (which also match this level itself).
    multi: Option<Box<Leaf>>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.exact.is_none()
            && self.multi.is_none()
    }
}

/// One matching subscription found for a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hit {
    /// The subscription.
    pub entry: SubEntry,
    /// Whether it was chosen as the one member of a shared subscription group.
    pub shared: bool,
}

/// All subscriptions of all sessions.
#[derive(Debug, Default)]
pub(crate) struct TopicTree {
    root: Node,
    count: usize,
}

impl TopicTree {
    /// Number of subscriptions stored (shared members included).
    pub fn len(&self) -> usize {
        self.count
    }

    /// Adds or replaces the subscription of `entry.session` on `filter`. Returns true when a
    /// subscription of that session on that filter (and group) already existed.
    pub fn insert(&mut self, filter: ParsedFilter<'_>, entry: SubEntry) -> bool {
        let mut node = &mut self.root;
        let mut ends_multi = false;
        for level in filter.filter.split('/') {
            match level {
                "#" => {
                    ends_multi = true;
                    break;
                }
                "+" => node = node.plus.get_or_insert_with(Box::default),
                exact => node = node.children.get_or_insert(exact),
            }
        }
        let slot = if ends_multi {
            &mut node.multi
        } else {
            &mut node.exact
        };
        let leaf = slot.get_or_insert_with(Box::default);
        let list = match filter.share_group {
            None => &mut leaf.subs,
            Some(name) => {
                let index = match leaf.shared.iter().position(|g| &*g.name == name) {
                    Some(index) => index,
                    None => {
                        leaf.shared.push(SharedGroup {
                            name: name.into(),
                            members: Vec::new(),
                            next: 0,
                        });
                        leaf.shared.len() - 1
                    }
                };
                &mut leaf.shared[index].members
            }
        };
        if let Some(existing) = list.iter_mut().find(|e| e.session == entry.session) {
            *existing = entry;
            true
        } else {
            if list.is_empty() {
                // Most filters have one subscriber (an agent's own topic).
                list.reserve_exact(1);
            }
            list.push(entry);
            self.count += 1;
            false
        }
    }

    /// Removes the subscription of `session` on `filter`; true when it existed.
    pub fn remove(&mut self, filter: ParsedFilter<'_>, session: SessionKey) -> bool {
        let removed = remove_in(
            &mut self.root,
            filter.filter.split('/'),
            filter.share_group,
            session,
        );
        if removed {
            self.count -= 1;
        }
        removed
    }

    /// One member of the shared subscription `filter` (`$share/{group}/{filter}`), round
    /// robin, preferring those for which `online` is true: in a cluster, the member that gets
    /// a message NATS gave this node for the group.
    pub fn pick_shared(
        &mut self,
        filter: ParsedFilter<'_>,
        online: &dyn Fn(SessionKey) -> bool,
    ) -> Option<SubEntry> {
        let name = filter.share_group?;
        let mut node = &mut self.root;
        let mut ends_multi = false;
        for level in filter.filter.split('/') {
            match level {
                "#" => {
                    ends_multi = true;
                    break;
                }
                "+" => node = node.plus.as_deref_mut()?,
                exact => node = node.children.get_mut(exact)?,
            }
        }
        let leaf = if ends_multi {
            &mut node.multi
        } else {
            &mut node.exact
        };
        let group = leaf
            .as_deref_mut()?
            .shared
            .iter_mut()
            .find(|g| &*g.name == name)?;
        group.pick(online)
    }

    /// Appends to `hits` every subscription matching `topic`: all normal subscriptions, and
    /// one member per matching shared group (round robin, preferring members for which
    /// `online` is true).
    pub fn matches(
        &mut self,
        topic: &str,
        online: &dyn Fn(SessionKey) -> bool,
        hits: &mut Vec<Hit>,
    ) {
        let dollar = topic.starts_with('$');
        match_in(&mut self.root, topic.split('/'), dollar, online, hits);
    }
}

fn remove_in(
    node: &mut Node,
    mut levels: Split<'_, char>,
    group: Option<&str>,
    session: SessionKey,
) -> bool {
    match levels.next() {
        None => remove_from_leaf(&mut node.exact, group, session),
        Some("#") => remove_from_leaf(&mut node.multi, group, session),
        Some("+") => {
            let Some(child) = node.plus.as_deref_mut() else {
                return false;
            };
            let removed = remove_in(child, levels, group, session);
            if child.is_empty() {
                node.plus = None;
            }
            removed
        }
        Some(level) => {
            let Some(child) = node.children.get_mut(level) else {
                return false;
            };
            let removed = remove_in(child, levels, group, session);
            if child.is_empty() {
                node.children.remove(level);
            }
            removed
        }
    }
}

fn remove_from_leaf(
    slot: &mut Option<Box<Leaf>>,
    group: Option<&str>,
    session: SessionKey,
) -> bool {
    let Some(leaf) = slot.as_deref_mut() else {
        return false;
    };
    let removed = match group {
        None => remove_member(&mut leaf.subs, session),
        Some(name) => match leaf.shared.iter().position(|g| &*g.name == name) {
            Some(index) => {
                let removed = remove_member(&mut leaf.shared[index].members, session);
                if leaf.shared[index].members.is_empty() {
                    leaf.shared.swap_remove(index);
                }
                removed
            }
            None => false,
        },
    };
    if leaf.is_empty() {
        *slot = None;
    }
    removed
}

fn remove_member(list: &mut Vec<SubEntry>, session: SessionKey) -> bool {
    match list.iter().position(|e| e.session == session) {
        Some(index) => {
            list.remove(index);
            true
        }
        None => false,
    }
}

fn match_in(
    node: &mut Node,
    mut levels: Split<'_, char>,
    dollar_root: bool,
    online: &dyn Fn(SessionKey) -> bool,
    hits: &mut Vec<Hit>,
) {
    // `x/#` matches `x` itself and everything below; at the root a `$` topic is not matched
    // by a leading wildcard.
    if !dollar_root && let Some(leaf) = node.multi.as_deref_mut() {
        collect(leaf, online, hits);
    }
    match levels.next() {
        None => {
            if let Some(leaf) = node.exact.as_deref_mut() {
                collect(leaf, online, hits);
            }
        }
        Some(level) => {
            if let Some(child) = node.children.get_mut(level) {
                match_in(child, levels.clone(), false, online, hits);
            }
            if !dollar_root && let Some(plus) = node.plus.as_deref_mut() {
                match_in(plus, levels, false, online, hits);
            }
        }
    }
}

fn collect(leaf: &mut Leaf, online: &dyn Fn(SessionKey) -> bool, hits: &mut Vec<Hit>) {
    hits.extend(leaf.subs.iter().map(|&entry| Hit {
        entry,
        shared: false,
    }));
    for group in &mut leaf.shared {
        if let Some(entry) = group.pick(online) {
            hits.push(Hit {
                entry,
                shared: true,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(session: SessionKey) -> SubEntry {
        SubEntry {
            session,
            qos: QoS::AtLeastOnce,
            no_local: false,
            retain_as_published: false,
            id: None,
        }
    }

    fn sessions_matching(tree: &mut TopicTree, topic: &str) -> Vec<SessionKey> {
        let mut hits = Vec::new();
        tree.matches(topic, &|_| true, &mut hits);
        let mut keys: Vec<_> = hits.iter().map(|h| h.entry.session).collect();
        keys.sort_unstable();
        keys
    }

    fn plain(filter: &str) -> ParsedFilter<'_> {
        parse_filter(filter).expect("valid filter in test")
    }

    /// A tree in which session `n` subscribes to the `n`th of `filters` (counting from 1).
    fn tree_of(filters: &[&str]) -> TopicTree {
        let mut tree = TopicTree::default();
        for (session, filter) in (1..).zip(filters) {
            tree.insert(plain(filter), entry(session));
        }
        tree
    }

    /// The specification's matching rules, written as plainly as possible.
    fn naive_matches(filter: &str, topic: &str) -> bool {
        let f: Vec<&str> = filter.split('/').collect();
        let t: Vec<&str> = topic.split('/').collect();
        if topic.starts_with('$') && (f[0] == "+" || f[0] == "#") {
            return false;
        }
        for (i, level) in f.iter().enumerate() {
            if *level == "#" {
                return true;
            }
            if i >= t.len() {
                return false;
            }
            if *level != "+" && *level != t[i] {
                return false;
            }
        }
        f.len() == t.len()
    }

    #[test]
    fn filter_validation_follows_the_spec() {
        for ok in [
            "a", "a/b", "+", "#", "a/+/c", "a/#", "+/+", "/", "a//b", "$SYS/#", "$share",
        ] {
            assert!(parse_filter(ok).is_some(), "{ok} should be valid");
        }
        for bad in [
            "",
            "a/#/b",
            "a#",
            "a/b+",
            "#/a",
            "a/+b/c",
            "$share/",
            "$share/g",
            "$share//a",
            "$share/g+/a",
            "$share/g/",
            "a\0b",
        ] {
            assert!(parse_filter(bad).is_none(), "{bad:?} should be invalid");
        }
        let shared = parse_filter("$share/workers/jobs/+").expect("valid");
        assert_eq!(shared.share_group, Some("workers"));
        assert_eq!(shared.filter, "jobs/+");
    }

    #[test]
    fn wildcards_match_as_specified() {
        let mut tree = tree_of(&[
            "sport/#",
            "sport/+/player1",
            "#",
            "+/tennis/+",
            "sport/tennis/player1",
            "+",
        ]);
        assert_eq!(
            sessions_matching(&mut tree, "sport/tennis/player1"),
            vec![1, 2, 3, 4, 5]
        );
        assert_eq!(sessions_matching(&mut tree, "sport"), vec![1, 3, 6]);
        assert_eq!(sessions_matching(&mut tree, "sport/"), vec![1, 3]);
        assert_eq!(sessions_matching(&mut tree, "other"), vec![3, 6]);
    }

    #[test]
    fn dollar_topics_are_not_matched_by_leading_wildcards() {
        let mut tree = tree_of(&["#", "+/monitor/Clients", "$SYS/#", "$SYS/monitor/+"]);
        assert_eq!(
            sessions_matching(&mut tree, "$SYS/monitor/Clients"),
            vec![3, 4]
        );
        assert_eq!(
            sessions_matching(&mut tree, "SYS/monitor/Clients"),
            vec![1, 2]
        );
    }

    #[test]
    fn removal_prunes_and_reports_existence() {
        let mut tree = TopicTree::default();
        assert!(!tree.insert(plain("a/+/c"), entry(1)));
        assert!(
            tree.insert(plain("a/+/c"), entry(1)),
            "second insert replaces"
        );
        tree.insert(plain("a/b/#"), entry(2));
        assert_eq!(tree.len(), 2);
        assert!(tree.remove(plain("a/+/c"), 1));
        assert!(!tree.remove(plain("a/+/c"), 1));
        assert!(
            !tree.remove(plain("a/b/#"), 1),
            "other session's subscription stays"
        );
        assert!(tree.remove(plain("a/b/#"), 2));
        assert_eq!(tree.len(), 0);
        assert!(tree.root.is_empty(), "all nodes pruned");
    }

    #[test]
    fn shared_groups_round_robin_and_prefer_online_members() {
        let mut tree = TopicTree::default();
        let f = parse_filter("$share/g/jobs/+").expect("valid");
        tree.insert(f, entry(1));
        tree.insert(f, entry(2));
        tree.insert(f, entry(3));
        let mut picks = Vec::new();
        for _ in 0..6 {
            picks.extend(sessions_matching(&mut tree, "jobs/x"));
        }
        assert_eq!(picks, vec![1, 2, 3, 1, 2, 3]);
        let mut hits = Vec::new();
        for _ in 0..3 {
            tree.matches("jobs/x", &|s| s == 2, &mut hits);
        }
        assert!(hits.iter().all(|h| h.entry.session == 2 && h.shared));
        assert!(tree.remove(f, 2));
        assert!(!tree.remove(parse_filter("$share/other/jobs/+").expect("valid"), 1));
    }

    #[test]
    fn exact_lookup_among_many_clients() {
        let mut tree = TopicTree::default();
        let filters: Vec<String> = (0..100_000).map(|i| format!("agents/{i}/wake")).collect();
        for (i, f) in filters.iter().enumerate() {
            tree.insert(plain(f), entry(i as SessionKey));
        }
        assert_eq!(sessions_matching(&mut tree, "agents/4242/wake"), vec![4242]);
        assert!(sessions_matching(&mut tree, "agents/4242/ack").is_empty());
    }

    #[test]
    fn levels_grow_from_a_list_into_a_map_and_shrink_back() {
        let mut tree = TopicTree::default();
        let n = 3 * FEW_CHILDREN as u64;
        for i in 0..n {
            tree.insert(plain(&format!("agents/{i}/wake")), entry(i));
            // Every earlier agent still gets its own wake-ups, and nobody else's.
            for j in 0..=i {
                assert_eq!(
                    sessions_matching(&mut tree, &format!("agents/{j}/wake")),
                    vec![j]
                );
            }
        }
        tree.insert(plain("agents/+/wake"), entry(1000));
        assert_eq!(sessions_matching(&mut tree, "agents/5/wake"), vec![5, 1000]);
        assert!(tree.remove(plain("agents/+/wake"), 1000));
        for i in (0..n).rev() {
            assert!(tree.remove(plain(&format!("agents/{i}/wake")), i));
            assert!(sessions_matching(&mut tree, &format!("agents/{i}/wake")).is_empty());
            for j in 0..i {
                assert_eq!(
                    sessions_matching(&mut tree, &format!("agents/{j}/wake")),
                    vec![j]
                );
            }
        }
        assert_eq!(tree.len(), 0);
        assert!(
            tree.root.is_empty(),
            "the emptied trie is pruned to its root"
        );
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just(String::new()),
            Just("$x".to_string()),
        ]
    }

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(level(), 1..5).prop_map(|l| l.join("/"))
    }

    fn filter() -> impl Strategy<Value = String> {
        let flevel = prop_oneof![level(), Just("+".to_string())];
        (prop::collection::vec(flevel, 0..5), any::<bool>()).prop_filter_map(
            "empty filter",
            |(mut levels, multi)| {
                if multi {
                    levels.push("#".to_string());
                }
                Some(levels.join("/")).filter(|f| !f.is_empty())
            },
        )
    }

    proptest! {
        #[test]
        fn trie_agrees_with_naive_matcher(
            filters in prop::collection::vec(filter(), 1..20),
            topics in prop::collection::vec(topic(), 1..10),
            removals in prop::collection::vec(any::<prop::sample::Index>(), 0..5),
        ) {
            let mut tree = TopicTree::default();
            for (i, f) in filters.iter().enumerate() {
                tree.insert(plain(f), entry(i as SessionKey));
            }
            let mut removed = std::collections::HashSet::new();
            for r in &removals {
                let i = r.index(filters.len());
                if removed.insert(i) {
                    prop_assert!(tree.remove(plain(&filters[i]), i as SessionKey));
                }
            }
            for t in &topics {
                let expected: Vec<SessionKey> = filters
                    .iter()
                    .enumerate()
                    .filter(|(i, f)| !removed.contains(i) && naive_matches(f, t))
                    .map(|(i, _)| i as SessionKey)
                    .collect();
                prop_assert_eq!(sessions_matching(&mut tree, t), expected.clone(), "topic {:?}", t);
                for (i, f) in filters.iter().enumerate() {
                    prop_assert_eq!(filter_matches(f, t), naive_matches(f, t), "filter {} topic {} ({})", f, t, i);
                }
            }
        }
    }
}
