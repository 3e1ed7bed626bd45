//! Building zeroboot templates: the guest artifacts (kernel, root image),
//! cached by content hash, and the boot-to-snapshot that makes a template.

pub mod artifacts;
pub mod cache;
pub mod progress;
pub mod runtime;
pub mod sources;
pub mod spec;
pub mod template;

pub use cache::Cache;
pub use progress::{Progress, Silent};
pub use runtime::{Runtime, RuntimeDescriptor};
pub use spec::{TemplateSpec, DEFAULT_MEM_MIB, DEFAULT_NAME};
pub use template::{TemplateError, TemplateInfo};
