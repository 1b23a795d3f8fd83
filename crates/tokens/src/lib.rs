//! Token-level pieces shared by the engine, the router and the frontend: block hashing
//! (defined once, so every component agrees on what a cached block is), tokenizers, chat
//! templates and incremental detokenization.

pub mod chat;
pub mod detok;
pub mod hash;
pub mod token_bytes;
pub mod tokenizer;

pub use chat::{ChatMessage, ChatOptions, ChatTemplate, ChatTemplateError};
pub use detok::{Decode, IncrementalDetokenizer, StopMatcher, StopOutput};
pub use hash::{block_hashes, hash_block, BlockHash, BLOCK_HASH_VERSION};
pub use token_bytes::TokenBytes;
pub use tokenizer::{Tokenizer, TokenizerError};
