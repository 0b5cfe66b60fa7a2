//! Text handling: caption segmentation (the paper's one-random-segment training text) and tag
//! vocabularies (short-tag classification targets).

pub mod clean;
pub mod segment;
pub mod tags;
pub mod tokenizer;
