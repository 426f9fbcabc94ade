//! Translation between MQTT 5 reason codes and MQTT 3.1.1 return codes (CONNACK, SUBACK).

use crate::ReasonCode;

impl ReasonCode {
    /// The MQTT 3.1.1 CONNACK return code for this code, as the encoder writes it: values
    /// 0..=5 are already v3.1.1 return codes and stay; 0x84 -> 1 (unacceptable protocol
    /// version), 0x85 -> 2 (identifier rejected), 0x86 -> 4 (bad user name or password),
    /// 0x87, 0x8A, 0x8C -> 5 (not authorized); every other code -> 3 (server unavailable).
    pub fn to_v311_connack(self) -> u8 {
        match self.0 {
            c @ 0..=5 => c,
            0x84 => 1,
            0x85 => 2,
            0x86 => 4,
            0x87 | 0x8A | 0x8C => 5,
            _ => 3,
        }
    }

    /// The MQTT 5 reason code that means what a v3.1.1 CONNACK return code means (a decoded
    /// v3.1.1 CONNACK keeps its return code 0..=5; this names it): 1 -> 0x84, 2 -> 0x85,
    /// 3 -> 0x88, 4 -> 0x86, 5 -> 0x87; anything else is returned unchanged.
    pub fn from_v311_connack(code: u8) -> Self {
        Self(match code {
            1 => 0x84,
            2 => 0x85,
            3 => 0x88,
            4 => 0x86,
            5 => 0x87,
            other => other,
        })
    }

    /// The MQTT 3.1.1 SUBACK return code for this code: granted QoS 0..=2 stay, every other
    /// code is a failure, 0x80 [MQTT-3.9.3-2].
    pub fn to_v311_suback(self) -> u8 {
        match self.0 {
            c @ 0..=2 => c,
            _ => 0x80,
        }
    }
}
