//! The flashpack file format, version 1: on-disk types ([`layout`]), the rules a
//! file must follow ([`error`], one variant per numbered MUST of
//! `formats/flashpack-v1.md`), the structural reader ([`reader`]) and the full
//! integrity check ([`integrity`]).

pub mod error;
pub mod integrity;
pub mod layout;
pub mod quant_policy;
pub mod reader;

pub use error::FormatError;
pub use reader::PackedFile;
