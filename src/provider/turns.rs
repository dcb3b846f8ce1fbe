//! Conversations for APIs whose turns must alternate between the user and the model
//! (Messages, Gemini): consecutive turns of one role are merged.

use serde_json::Value;

/// Appends `items` to a conversation as a turn of `role`, merged into the previous turn when it
/// has the same role: Messages and Gemini want user and assistant turns to alternate. `field`
/// names the turn's item list (`content` or `parts`).
pub(crate) fn push_turn(turns: &mut Vec<Value>, role: &str, field: &str, items: Vec<Value>) {
    if items.is_empty() {
        return;
    }
    if let Some(last) = turns.last_mut()
        && last["role"] == role
        && let Some(existing) = last[field].as_array_mut()
    {
        existing.extend(items);
        return;
    }
    let mut turn = serde_json::Map::new();
    turn.insert("role".into(), Value::from(role));
    turn.insert(field.into(), Value::Array(items));
    turns.push(Value::Object(turn));
}
