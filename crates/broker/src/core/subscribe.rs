//! SUBSCRIBE and UNSUBSCRIBE: the topic tree, the session's list of filters, the cluster's
//! interest, and retained messages sent at subscription.

use std::time::Instant;

use beckon_mqtt::{
    Packet, Properties, ProtocolVersion, ReasonCode, RetainHandling, SubAck, Subscribe, UnsubAck,
    Unsubscribe,
};

use super::cluster::{note_session_interest, unpark};
use super::session::Pending;
use super::topic_tree::{SessionKey, SubEntry, parse_filter};
use super::{Action, BrokerCore, ConnId};

impl BrokerCore {
    pub(super) fn on_subscribe(
        &mut self,
        now: Instant,
        conn: ConnId,
        key: SessionKey,
        subscribe: Subscribe,
        out: &mut Vec<Action>,
    ) {
        let shared_no_local = subscribe.subscriptions.iter().any(|s| {
            s.options.no_local && parse_filter(&s.filter).is_some_and(|f| f.share_group.is_some())
        });
        if shared_no_local {
            // [MQTT-3.8.3-4]
            self.kick(now, conn, ReasonCode::PROTOCOL_ERROR, out);
            return;
        }
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        let v5 = session.protocol == ProtocolVersion::V5;
        let sub_id = subscribe
            .properties
            .subscription_identifiers
            .first()
            .copied();
        let mut codes = Vec::with_capacity(subscribe.subscriptions.len());
        let mut retained = Vec::new();
        let mut over_quota = false;
        for sub in &subscribe.subscriptions {
            let Some(filter) = parse_filter(&sub.filter) else {
                codes.push(if v5 {
                    ReasonCode::TOPIC_FILTER_INVALID
                } else {
                    ReasonCode::UNSPECIFIED_ERROR
                });
                continue;
            };
            let qos = sub.options.qos.min(self.config.max_qos);
            let existed = self.tree.insert(
                filter,
                SubEntry {
                    session: key,
                    qos,
                    no_local: sub.options.no_local,
                    retain_as_published: sub.options.retain_as_published,
                    id: sub_id,
                },
            );
            if !existed && session.subscriptions.len() >= self.config.max_subscriptions {
                // Found new by the tree's own lookup (a scan of the session's list would cost
                // a flood of filters its square): taken out again.
                self.tree.remove(filter, key);
                codes.push(if v5 {
                    ReasonCode::QUOTA_EXCEEDED
                } else {
                    ReasonCode::UNSPECIFIED_ERROR
                });
                over_quota = true;
                continue;
            }
            if !existed {
                session.subscriptions.push(sub.filter.as_str().into());
                if let Some(cluster) = &mut self.cluster {
                    note_session_interest(cluster, key, &session.client_id, &sub.filter, true);
                }
            }
            codes.push(ReasonCode(qos as u8));
            // Retained messages are never sent for shared subscriptions.
            let send_retained = filter.share_group.is_none()
                && match sub.options.retain_handling {
                    RetainHandling::SendAtSubscribe => true,
                    RetainHandling::SendAtSubscribeIfNew => !existed,
                    RetainHandling::DoNotSend => false,
                };
            if let Some(cluster) = &mut self.cluster
                && filter.share_group.is_none()
            {
                for msg in unpark(cluster, key, filter.filter) {
                    retained.push(Pending {
                        qos: msg.qos.min(qos),
                        retain: false,
                        sub_ids: sub_id.into_iter().collect(),
                        msg,
                    });
                }
            }
            if send_retained {
                for msg in self.retained.matching(filter.filter, now) {
                    retained.push(Pending {
                        qos: msg.qos.min(qos),
                        retain: true,
                        sub_ids: sub_id.into_iter().collect(),
                        msg,
                    });
                }
            }
        }
        out.push(Action::Send {
            conn,
            packet: Packet::SubAck(SubAck {
                packet_id: subscribe.packet_id,
                codes,
                properties: Properties::default(),
            }),
        });
        for delivery in retained {
            session.deliver(now, delivery, &self.config, &mut self.stats, out);
        }
        if over_quota {
            let client_id = session.client_id.clone();
            self.quota_reached(now, super::Quota::Subscriptions, &client_id);
        }
    }

    pub(super) fn on_unsubscribe(
        &mut self,
        conn: ConnId,
        key: SessionKey,
        unsubscribe: Unsubscribe,
        out: &mut Vec<Action>,
    ) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        let v5 = session.protocol == ProtocolVersion::V5;
        let mut codes = Vec::new();
        for raw in &unsubscribe.filters {
            // The tree's lookup first: a scan of the session's filters for each filter of a
            // packet that names hundreds of thousands held the core for seconds.
            let removed = parse_filter(raw).is_some_and(|filter| self.tree.remove(filter, key));
            if removed {
                if let Some(index) = session.subscriptions.iter().position(|f| **f == **raw) {
                    session.subscriptions.swap_remove(index);
                }
                if let Some(cluster) = &mut self.cluster {
                    note_session_interest(cluster, key, &session.client_id, raw, false);
                }
            }
            if v5 {
                codes.push(if removed {
                    ReasonCode::SUCCESS
                } else {
                    ReasonCode::NO_SUBSCRIPTION_EXISTED
                });
            }
        }
        out.push(Action::Send {
            conn,
            packet: Packet::UnsubAck(UnsubAck {
                packet_id: unsubscribe.packet_id,
                codes,
                properties: Properties::default(),
            }),
        });
    }
}
