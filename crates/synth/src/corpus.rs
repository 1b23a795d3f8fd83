//! A deterministic, English-like training corpus for the synthetic tokenizer: common words
//! and made-up syllable words drawn with a Zipf-like law, capitalised sentences with
//! punctuation, numbers, quotes, a little code and a sprinkle of non-ASCII text (so the
//! vocabulary holds both merged multi-byte characters and bare byte tokens). The text is a
//! pure function of its seed and size.

use crate::rng::Rng;

const COMMON: &[&str] = &[
    "the", "of", "and", "to", "a", "in", "is", "it", "you", "that", "he", "was", "for", "on",
    "are", "with", "as", "I", "his", "they", "be", "at", "one", "have", "this", "from", "or",
    "had", "by", "not", "word", "but", "what", "some", "we", "can", "out", "other", "were", "all",
    "there", "when", "up", "use", "your", "how", "said", "an", "each", "she", "which", "do",
    "their", "time", "if", "will", "way", "about", "many", "then", "them", "write", "would",
    "like", "so", "these", "her", "long", "make", "thing", "see", "him", "two", "has", "look",
    "more", "day", "could", "go", "come", "did", "number", "sound", "no", "most", "people", "my",
    "over", "know", "water", "than", "call", "first", "who", "may", "down", "side", "been", "now",
    "find", "any", "new", "work", "part", "take", "get", "place", "made", "live", "where", "after",
    "back", "little", "only", "round", "man", "year", "came", "show", "every", "good", "me",
    "give", "our", "under", "name", "very", "through", "just", "form", "sentence", "great",
    "think", "say", "help", "low", "line", "differ", "turn", "cause", "much", "mean", "before",
    "move", "right", "boy", "old", "too", "same", "tell", "does", "set", "three", "want", "air",
    "well", "also", "play", "small", "end", "put", "home", "read", "hand", "port", "large",
    "spell", "add", "even", "land", "here", "must", "big", "high", "such", "follow", "act", "why",
    "ask", "men", "change", "went", "light", "kind", "off", "need", "house", "picture", "try",
    "us", "again", "animal", "point", "mother", "world", "near", "build", "self", "earth",
    "father", "head", "stand", "own", "page", "should", "country", "found", "answer", "school",
    "grow", "study", "still", "learn", "plant", "cover", "food", "sun", "four", "between", "state",
    "keep", "eye", "never", "last", "let", "thought", "city", "tree", "cross", "farm", "hard",
    "start", "might", "story", "saw", "far", "sea", "draw", "left", "late", "run", "don't",
    "while", "press", "close", "night", "real", "life", "few", "north", "open", "seem", "together",
    "next", "white", "children", "begin", "got", "walk", "example", "ease", "paper", "group",
    "always", "music", "those", "both", "mark", "often", "letter", "until", "mile", "river", "car",
    "feet", "care", "second", "book", "carry", "took", "science", "eat", "room", "friend", "began",
    "idea", "fish", "mountain", "stop", "once", "base", "hear", "horse", "cut", "sure", "watch",
    "color", "face", "wood", "main", "enough", "plain", "girl", "usual", "young", "ready", "above",
    "ever", "red", "list", "though", "feel", "talk", "bird", "soon", "body", "dog", "family",
    "direct", "pose", "leave", "song", "measure", "door", "product", "black", "short", "numeral",
    "class", "wind", "question", "happen", "complete", "ship", "area", "half", "rock", "order",
    "fire", "south", "problem", "piece", "it's", "can't", "won't", "model", "token", "engine",
    "cache", "server", "request",
];

const ONSETS: &[&str] = &[
    "", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
    "br", "cl", "dr", "fl", "gr", "pl", "pr", "sh", "st", "th", "tr", "ch", "qu", "sp",
];
const VOWELS: &[&str] = &[
    "a", "e", "i", "o", "u", "ai", "ea", "ee", "oo", "ou", "ie", "y",
];
const CODAS: &[&str] = &[
    "", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck", "x", "rt", "ll",
];
const NON_ASCII: &[&str] = &[
    "café",
    "naïve",
    "über",
    "Straße",
    "façade",
    "señor",
    "jalapeño",
    "résumé",
    "—",
    "…",
    "“quoted”",
    "日本語",
    "中文",
    "한국어",
    "привет",
    "Ωμέγα",
    "😀",
    "🚀",
    "€5",
    "½",
];
const CODE: &[&str] = &[
    "fn main() {\n    println!(\"hello\");\n}",
    "for i in range(10):\n    total += i * 2",
    "if (x > 0) { return x; } else { return -x; }",
    "let v: Vec<u32> = vec![1, 2, 3];",
    "def f(a, b=None):\n\treturn a or b",
    "{\"key\": \"value\", \"n\": 42}",
    "SELECT name FROM users WHERE id = 7;",
];
const ENDINGS: &[&str] = &[".", ".", ".", ".", "?", "!", ";", ":"];

/// A Zipf-like sampler over a word list: weight 1 / (rank + 2.7).
struct Lexicon {
    words: Vec<String>,
    cumulative: Vec<f64>,
}

impl Lexicon {
    fn new(rng: &mut Rng, made_up: usize) -> Self {
        let mut words: Vec<String> = COMMON.iter().map(|w| w.to_string()).collect();
        for _ in 0..made_up {
            let syllables = 1 + rng.below(3);
            let mut w = String::new();
            for _ in 0..syllables {
                w.push_str(ONSETS[rng.below(ONSETS.len())]);
                w.push_str(VOWELS[rng.below(VOWELS.len())]);
                w.push_str(CODAS[rng.below(CODAS.len())]);
            }
            words.push(w);
        }
        let mut total = 0.0;
        let cumulative = (0..words.len())
            .map(|rank| {
                total += 1.0 / (rank as f64 + 2.7);
                total
            })
            .collect();
        Lexicon { words, cumulative }
    }

    fn sample(&self, rng: &mut Rng) -> &str {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let x = rng.unit() * total;
        let i = self.cumulative.partition_point(|&c| c <= x);
        &self.words[i.min(self.words.len() - 1)]
    }
}

fn number(rng: &mut Rng) -> String {
    match rng.below(5) {
        0 => format!("{}", 1800 + rng.below(230)),
        1 => format!("{}.{}", rng.below(100), rng.below(100)),
        2 => format!("{}%", rng.below(101)),
        3 => format!("{}", rng.below(10)),
        _ => format!("{}", rng.below(1_000_000)),
    }
}

fn sentence(rng: &mut Rng, lex: &Lexicon, out: &mut String) {
    let n = 3 + rng.below(14);
    for i in 0..n {
        if i > 0 {
            out.push(' ');
        }
        let roll = rng.below(1000);
        let word = if roll < 40 {
            number(rng)
        } else if roll < 46 {
            NON_ASCII[rng.below(NON_ASCII.len())].to_string()
        } else {
            lex.sample(rng).to_string()
        };
        if i == 0 {
            let mut chars = word.chars();
            if let Some(c) = chars.next() {
                out.extend(c.to_uppercase());
                out.push_str(chars.as_str());
            }
        } else if rng.below(30) == 0 {
            out.push('"');
            out.push_str(&word);
            out.push('"');
        } else if rng.below(40) == 0 {
            out.push('(');
            out.push_str(&word);
            out.push(')');
        } else {
            out.push_str(&word);
        }
        if i + 1 < n && rng.below(12) == 0 {
            out.push(',');
        }
    }
    out.push_str(ENDINGS[rng.below(ENDINGS.len())]);
}

/// Paragraphs of text totalling at least `bytes` bytes, each a separate training sequence.
pub fn generate(seed: u64, bytes: usize, made_up_words: usize) -> Vec<String> {
    let mut rng = Rng::for_stream(seed, "corpus", 0);
    let lex = Lexicon::new(&mut rng, made_up_words);
    let mut paragraphs = Vec::new();
    let mut total = 0;
    while total < bytes {
        let mut p = String::new();
        if rng.below(25) == 0 {
            p.push_str(CODE[rng.below(CODE.len())]);
        } else {
            for s in 0..1 + rng.below(5) {
                if s > 0 {
                    p.push(' ');
                }
                sentence(&mut rng, &lex, &mut p);
            }
        }
        p.push_str(if rng.below(3) == 0 { "\n" } else { "\n\n" });
        total += p.len();
        paragraphs.push(p);
    }
    paragraphs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_sized() {
        let a = generate(1, 50_000, 500);
        let b = generate(1, 50_000, 500);
        assert_eq!(a, b);
        let len: usize = a.iter().map(String::len).sum();
        assert!((50_000..52_000).contains(&len), "{len}");
        assert_ne!(a, generate(2, 50_000, 500));
        let text = a.concat();
        assert!(text.contains("the") && text.contains('\n') && text.contains('.'));
        assert!(!text.is_ascii());
    }
}
