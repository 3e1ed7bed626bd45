//! Building zeroboot templates: the guest artifacts (kernel, root image),
//! cached by content hash, and the boot-to-snapshot that makes a template.

pub mod archive;
pub mod artifacts;
pub mod build;
pub mod cache;
pub mod error;
pub mod progress;
pub mod runtime;
pub mod sources;
pub mod spec;
pub mod store;

pub use build::build;
pub use cache::Cache;
pub use error::TemplateError;
pub use progress::{Progress, Silent};
pub use runtime::{Runtime, RuntimeDescriptor};
pub use spec::{TemplateSpec, DEFAULT_MEM_MIB, DEFAULT_NAME};
pub use store::{list, open, read_info, template_dir, verify, TemplateInfo, BOOT_LOG, METADATA_FILE};
