//! Template specs (TOML from users): parsing and checking never panic, and a
//! spec that passes has only entries that are safe to hand to debootstrap,
//! pip and the guest's environment.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zeroboot_template::TemplateSpec;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(spec) = TemplateSpec::from_toml(text) else {
        return;
    };
    for item in spec.all_packages().iter().chain(&spec.wheels) {
        assert!(!item.starts_with('-') && !item.contains('/') && !item.contains('\n'), "{item:?}");
    }
    for (key, value) in &spec.env {
        assert!(!key.contains('=') && !value.contains('\0'), "{key:?}");
    }
    let _ = spec.agent_config();
    let _ = spec.env_script();
});
