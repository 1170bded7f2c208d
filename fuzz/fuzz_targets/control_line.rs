//! The control protocol: any request line gets exactly one reply line of valid JSON with `ok`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use vback_common::control::{ControlHandler, DaemonInfo, handle_line};

struct Info;
impl DaemonInfo for Info {
    fn daemon_status(&self) -> Value {
        Value::Null
    }
}
struct Dev;
impl ControlHandler for Dev {}

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    let reply = handle_line(&Info, &Dev, &line);
    assert!(!reply.contains('\n'));
    let v: Value = serde_json::from_str(&reply).expect("the reply is JSON");
    assert!(v["ok"].is_boolean());
});
