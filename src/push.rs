//! `peftkit::push`: publishing a folder to the Hugging Face Hub in one commit. The code lives in
//! [`crate::hub::push`]; this module keeps the `peftkit::push::…` paths working.

pub use crate::hub::push::*;
