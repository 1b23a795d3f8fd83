//! Per-token bytes for byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen, our synth
//! models). Their decoder maps every character of every token back to one byte and decodes
//! the concatenation as lossy UTF-8, so decoding is context-free: the text of a stream of
//! ids is the UTF-8 of the concatenated per-token bytes. With a table of those bytes,
//! incremental detokenization is a byte append and a UTF-8 check per token, instead of two
//! calls into the tokenizer's generic decoder (each allocating a string per id).
//!
//! The table is built only when the tokenizer's decoder is exactly `ByteLevel`, and it is
//! checked against the tokenizer's own `decode` for every id before it is used, so a
//! decoder that behaves differently falls back to the generic path rather than changing
//! output.

use tokenizers::DecoderWrapper;

/// The bytes each token id decodes to.
#[derive(Debug)]
pub struct TokenBytes {
    /// Every token's bytes, back to back.
    data: Vec<u8>,
    /// `data[offsets[id]..offsets[id + 1]]` are the bytes of `id`.
    offsets: Vec<u32>,
    /// Ids that `decode(.., skip_special_tokens = true)` leaves out.
    special: Vec<bool>,
}

impl TokenBytes {
    /// The table for `tok`, or `None` when its decoding is not a plain byte concatenation.
    pub fn build(tok: &tokenizers::Tokenizer) -> Option<Self> {
        if !matches!(tok.get_decoder(), Some(DecoderWrapper::ByteLevel(_))) {
            return None;
        }
        let unicode_to_byte = unicode_to_byte();
        let ids = tok.get_vocab(true).into_values().max().map_or(0, |m| m + 1);
        let added = tok.get_added_vocabulary();
        let mut table = TokenBytes {
            data: Vec::new(),
            offsets: Vec::with_capacity(ids as usize + 1),
            special: Vec::with_capacity(ids as usize),
        };
        table.offsets.push(0);
        for id in 0..ids {
            let token = tok.id_to_token(id);
            if let Some(t) = &token {
                let start = table.data.len();
                // A token with a character outside the byte alphabet (an added token
                // written in plain text) decodes to its own UTF-8, as the decoder does.
                let mapped = t.chars().all(|c| match unicode_to_byte(c) {
                    Some(b) => {
                        table.data.push(b);
                        true
                    }
                    None => false,
                });
                if !mapped {
                    table.data.truncate(start);
                    table.data.extend_from_slice(t.as_bytes());
                }
            }
            table.offsets.push(u32::try_from(table.data.len()).ok()?);
            table
                .special
                .push(token.is_some_and(|t| added.is_special_token(&t)));
        }
        // The decoder's own rendering of each id must agree with the table's.
        for id in 0..ids {
            let ours = String::from_utf8_lossy(table.get(id, false));
            if tok.decode(&[id], false).ok()? != ours {
                return None;
            }
        }
        Some(table)
    }

    /// The bytes of `id`: empty for an unknown id, and for a special token when
    /// `skip_special_tokens` is set (what `decode` does).
    pub fn get(&self, id: u32, skip_special_tokens: bool) -> &[u8] {
        let i = id as usize;
        if i + 1 >= self.offsets.len() || (skip_special_tokens && self.special[i]) {
            return &[];
        }
        &self.data[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }
}

/// The inverse of GPT-2's byte-to-character alphabet: printable Latin-1 bytes stand for
/// themselves, and the 68 others (controls, space, 0x7f..=0xa0, 0xad) were given the code
/// points from U+0100 upwards, in byte order.
fn unicode_to_byte() -> impl Fn(char) -> Option<u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
    let mut shifted = [0u8; 68];
    let mut n = 0;
    for b in 0..=255u8 {
        if !printable(b) {
            shifted[n] = b;
            n += 1;
        }
    }
    move |c: char| {
        let cp = c as u32;
        match u8::try_from(cp) {
            Ok(b) if printable(b) => Some(b),
            Ok(_) => None,
            Err(_) => cp
                .checked_sub(256)
                .and_then(|k| shifted.get(k as usize).copied()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alphabet_covers_every_byte_once() {
        let map = unicode_to_byte();
        let mut seen = [false; 256];
        for cp in 0..0x200u32 {
            if let Some(b) = char::from_u32(cp).and_then(&map) {
                assert!(!seen[b as usize], "byte {b} mapped twice");
                seen[b as usize] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(map('A'), Some(b'A'));
        assert_eq!(map('Ġ'), Some(b' ')); // U+0120, GPT-2's space
        assert_eq!(map('Ċ'), Some(b'\n')); // U+010A
        assert_eq!(map(' '), None);
        assert_eq!(map('日'), None);
    }
}
