//! The payload of a MARK record (docs/JOURNAL_FORMAT.md, "Record kinds"):
//! JSON `{"label": L}`, plus `"quiesced": true` when the guest's filesystems
//! were frozen through its guest agent while the mark was taken (`cdpctl
//! mark --quiesce`). The field is absent for a crash-consistent mark, so an
//! ordinary mark's payload is byte-identical to earlier versions', and
//! readers of earlier versions (which read only `label`) list a quiesced mark
//! as a mark. A payload without the field reads as not quiesced.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkPayload {
    pub label: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub quiesced: bool,
}

impl MarkPayload {
    /// Parse a MARK payload; `None` when it is not the JSON of a mark.
    pub fn parse(payload: &[u8]) -> Option<MarkPayload> {
        serde_json::from_slice(payload).ok()
    }
}

/// The JSON payload cdpd writes for a mark.
pub fn mark_payload(label: &str, quiesced: bool) -> serde_json::Value {
    serde_json::to_value(MarkPayload {
        label: label.to_string(),
        quiesced,
    })
    .unwrap_or_else(|_| serde_json::json!({ "label": label }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ordinary_mark_keeps_the_old_payload_and_old_payloads_are_not_quiesced() {
        assert_eq!(
            serde_json::to_vec(&mark_payload("m1", false)).unwrap(),
            br#"{"label":"m1"}"#
        );
        assert_eq!(
            serde_json::to_vec(&mark_payload("db", true)).unwrap(),
            br#"{"label":"db","quiesced":true}"#
        );
        // What every earlier cdpd wrote.
        let old = MarkPayload::parse(br#"{"label":"m1"}"#).unwrap();
        assert_eq!((old.label.as_str(), old.quiesced), ("m1", false));
        let q = MarkPayload::parse(br#"{"label":"db","quiesced":true}"#).unwrap();
        assert!(q.quiesced);
        // A later version's extra fields do not hide the mark.
        let later = MarkPayload::parse(br#"{"label":"x","quiesced":true,"by":"agent"}"#);
        assert_eq!(later.map(|m| m.quiesced), Some(true));
        assert_eq!(MarkPayload::parse(b"not json"), None);
    }
}
