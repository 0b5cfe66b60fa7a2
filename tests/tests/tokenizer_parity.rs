//! Parity of `hq_data::text::tokenizer::ClipTokenizer` with open_clip's tokenizer.
//!
//! Generates a seeded, adversarial corpus (captions, HTML entities, emoji, many scripts, mojibake
//! made the way it happens in the wild, curly quotes, ligatures, fullwidth forms, control
//! characters, terminal escapes, line breaks, very long texts, whitespace-only strings, number and
//! punctuation runs, special-token look-alikes, random code points from all over Unicode), runs
//! `tests/python/tokenizer_reference.py` (open_clip in the project's venv) on it and requires
//! identical ids for every string, printing the first mismatches with the cleaned texts.
//!
//! Python: `$HQ_PYTHON` (exported by `tools/env.sh`), else `<workspace>/.venv/bin/python`.
//! `HQ_TOKENIZER_PARITY_SEED=<n>` generates the corpus from another seed (fuzzing);
//! `HQ_TOKENIZER_PARITY_DUMP=<path>` keeps a copy of the corpus (JSONL, one string a line).

use std::io::Write;
use std::path::Path;
use std::process::Command;

use hq_data::text::tokenizer::ClipTokenizer;
use hq_tests::{python, workspace_root};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SEED: u64 = 0x00C1_1B70_4E5E;

// ------------------------------------------------------------------------------------------
// Corpus pieces
// ------------------------------------------------------------------------------------------

const WORDS: &[&str] = &[
    "a",
    "the",
    "photo",
    "picture",
    "image",
    "of",
    "on",
    "in",
    "with",
    "and",
    "at",
    "near",
    "cat",
    "dog",
    "man",
    "woman",
    "child",
    "children",
    "people",
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "white",
    "old",
    "new",
    "small",
    "large",
    "car",
    "bicycle",
    "street",
    "beach",
    "sunset",
    "mountain",
    "lake",
    "river",
    "city",
    "night",
    "park",
    "garden",
    "flowers",
    "tree",
    "house",
    "window",
    "table",
    "coffee",
    "cup",
    "book",
    "hat",
    "shirt",
    "wearing",
    "sitting",
    "running",
    "playing",
    "holding",
    "close-up",
    "view",
    "aerial",
    "vintage",
    "it's",
    "don't",
    "we're",
    "they've",
    "I'm",
    "you'll",
    "he'd",
    "O'Brien",
    "rock'n'roll",
    "McDonald's",
    "U.S.A.",
    "e-mail",
    "T-shirt",
    "4K",
    "HD",
    "iPhone",
    "3D",
    "x-ray",
    "#sunset",
    "@user",
    "www.example.com",
    "https://example.com/a?b=c&d=e",
    "user_name",
    "C++",
    "A&W",
    "AT&T",
    "50%",
    "$19.99",
    "£5",
    "€10",
    "¥500",
    "#1",
    "2nd",
    "1990s",
    "10:30",
    "3.14",
    "1,000,000",
    "+44",
    "(c)",
    "[1]",
];

const INTL: &[&str] = &[
    "café",
    "naïve",
    "résumé",
    "Straße",
    "GROSSE",
    "Größe",
    "Ærøskøbing",
    "São Paulo",
    "Kraków",
    "Łódź",
    "İstanbul",
    "ŞİŞLİ",
    "ıi",
    "Ελληνικά",
    "ΟΔΟΣ",
    "ΣΊΣΥΦΟΣ",
    "ὈΔΥΣΣΕΎΣ",
    "Σ",
    "ΑΣ.",
    "Москва",
    "Привет мир",
    "ЁЛКА",
    "東京タワー",
    "北京烤鸭",
    "한국어 텍스트",
    "日本語の文章",
    "العربية",
    "مرحبا بالعالم",
    "שלום עולם",
    "हिन्दी भाषा",
    "ภาษาไทย",
    "Tiếng Việt có dấu",
    "ǅemal",
    "ǈiljana",
    "Ǌegoš",
    "Ĳsselmeer",
    "ŉ",
    "Zürich",
    "Ångström",
    "Œuvre",
    "cœur",
    "ﬁnance",
    "ﬂower",
    "Ⅻ",
    "ⅷ",
    "Ⓐⓑ",
    "ＡＢＣ",
    "ｶﾀｶﾅ",
    "ﾊﾟﾝ",
    "ｶﾞ",
    "e\u{301}",
    "A\u{30a}",
    "\u{1100}\u{1161}\u{11a8}",
    "ᄀ\u{1161}",
    "Ω",
    "K",
    "Å",
    "ﬀ",
    "ǰ",
    "ẞ",
    "ß",
    "ᾼ",
    "ῼ",
    "ΐ",
    "\u{345}",
    "ι\u{345}",
    "x\u{345}y",
    "𐐀𐐨",
    "𞤀𞤢",
    "𖹀𖹠",
    "\u{10d50}\u{10d70}",
    "\u{a7cb}\u{a7dc}",
    "\u{1c89}\u{1c8a}",
    "ꭰ",
    "Ꭰ",
    "ǅ",
    "ꟹ",
    "ᲀ",
    "ꙋ",
    "\u{1e9e}",
    "ﬅ",
    "ﬆ",
    "ſt",
    "it'ſ",
    "Ὀδυσσεύς",
    "ἙΛΛΆΣ",
    "ΌΣΟΣ",
    "Σ̈",
    "ΑΣ\u{301}",
    "ΑΣ'Α",
    "Α.Σ",
    "ς",
    "ϲ",
    "Ϲ",
    "ᵃ",
    "ʰᵃΣ",
];

const EMOJI: &[&str] = &[
    "😀",
    "😂",
    "👍",
    "👍🏽",
    "👍🏿",
    "👨‍👩‍👧‍👦",
    "👩‍❤️‍💋‍👨",
    "🏳️‍🌈",
    "🏴‍☠️",
    "🇯🇵",
    "🇺🇸",
    "🇪🇺",
    "1️⃣",
    "#️⃣",
    "❤️",
    "❤",
    "🐱",
    "🧑🏿‍💻",
    "✔",
    "✔️",
    "☕",
    "🤷‍♀️",
    "👁‍🗨",
    "🏴󠁧󠁢󠁷󠁬󠁳󠁿",
    "🫠",
    "🪿",
    "🩷",
    "🐦‍🔥",
    "🙂‍↔️",
    "©️",
    "™",
    "®",
    "☺",
    "✨",
    "🔥🔥🔥",
    "💯",
    "🎉🎊",
];

const ENTITIES: &[&str] = &[
    "&amp;",
    "&quot;",
    "&#39;",
    "&#x27;",
    "&nbsp;",
    "&amp;amp;",
    "&amp;quot;",
    "&lt;",
    "&gt;",
    "&lt;b&gt;",
    "&eacute;",
    "&EACUTE;",
    "&Eacute;",
    "&eAcute;",
    "&ntilde;",
    "&NTILDE;",
    "&hellip;",
    "&mdash;",
    "&ndash;",
    "&rsquo;",
    "&ldquo;",
    "&rdquo;",
    "&#8217;",
    "&#x2019;",
    "&#X2019;",
    "&#128;",
    "&#150;",
    "&#0;",
    "&#1;",
    "&#13;",
    "&#x0D;",
    "&#xD800;",
    "&#99999999;",
    "&#x110000;",
    "&ampxyz",
    "&amp",
    "&notit;",
    "&not",
    "&copy",
    "&copy2023",
    "&#65",
    "&#x41",
    "&#x;",
    "&#;",
    "&",
    "&&",
    "& ;",
    "&;",
    "&nosuchentity;",
    "&SZLIG;",
    "&szlig;",
    "&AElig;",
    "&aelig;",
    "&AELIG;",
    "&Jscr;",
    "&HilbertSpace;",
    "&checkmark;",
    "&fjlig;",
    "&NotEqualTilde;",
    "&nbsp",
    "&NBSP;",
    "&euro;",
    "&EURO;",
    "&trade;",
    "&TRADE;",
    "&#x1F600;",
    "&#128512;",
    "&#xfffe;",
    "&#xFDD0;",
    "&#127;",
    "&#x9F;",
    "&#x81;",
    "&amp;#39;",
    "&amp;lt;",
    "&#38;#39;",
    "&ltb",
    "&lt;tag attr=&quot;x&quot;&gt;",
    "&#0000000065;",
    "&#x0000041;",
    "&abcdefghijklmnopqrstuvwxyzabcdefgh;",
    "&aacute",
    "&Aacute",
    "&aacutex",
    "&sup2",
    "&frac12;",
    "&frac12",
    "&times;",
    "&divide",
];

const QUOTES: &[&str] = &[
    "‘single’",
    "“double”",
    "‚low‘",
    "„low“",
    "‹angle›",
    "«guillemets»",
    "ʼn",
    "it’s",
    "don‛t",
    "‟reversed”",
    "′prime″",
    "`backtick´",
];

const CONTROLS: &[&str] = &[
    "\0",
    "\x01",
    "\x07",
    "\x08",
    "\x0b",
    "\x0c",
    "\x0e",
    "\x1a",
    "\x1b",
    "\x1c",
    "\x1d",
    "\x1e",
    "\x1f",
    "\x7f",
    "\u{80}",
    "\u{81}",
    "\u{85}",
    "\u{8d}",
    "\u{90}",
    "\u{91}",
    "\u{92}",
    "\u{93}",
    "\u{9d}",
    "\u{9f}",
    "\u{200b}",
    "\u{200c}",
    "\u{200d}",
    "\u{200e}",
    "\u{202e}",
    "\u{2028}",
    "\u{2029}",
    "\u{2060}",
    "\u{206a}",
    "\u{206f}",
    "\u{feff}",
    "\u{fff9}",
    "\u{fffb}",
    "\u{fffc}",
    "\u{fffd}",
    "\u{e0041}",
    "\u{1d173}",
    "\x1b[31m",
    "\x1b[1;32m",
    "\x1b[0m",
    "\x1b[m",
    "\x1b[38;5;196m",
    "\x1b[",
    "\x1b[12",
    "\x1b[١٢m",
    "\x1b]0;title\x07",
    "\r",
    "\r\n",
    "\n",
    "\t",
    "\n\n",
    "\r\r\n",
    "\u{180e}",
];

const SPACES: &[&str] = &[
    " ", "  ", "\t", "\n", "\r\n", "\u{a0}", "\u{1680}", "\u{2000}", "\u{2002}", "\u{2003}",
    "\u{2009}", "\u{200a}", "\u{202f}", "\u{205f}", "\u{3000}", "\u{85}", "\u{2028}", "\x0b",
    "\x0c", "\x1c", "\x1f", "\u{200b}", "\u{180e}", "\u{feff}",
];

const PUNCT: &[&str] = &[
    "!",
    "!!!",
    "?!",
    "...",
    "…",
    "--",
    "—",
    "–",
    "-",
    "_",
    "__init__",
    "***",
    "~~",
    "::",
    ";;",
    "()",
    "[]",
    "{}",
    "<>",
    "</w>",
    "<start_of_text>",
    "<end_of_text>",
    "<START_OF_TEXT>",
    "<End_Of_Text>",
    "<ſtart_of_text>",
    "<<start_of_text>>",
    "x<start_of_text>y",
    "'s",
    "'S",
    "'t",
    "'re",
    "'RE",
    "'ve",
    "'m",
    "'ll",
    "'LL",
    "'d",
    "''s",
    "'",
    "''",
    "'x",
    "\"",
    "\\",
    "/",
    "|",
    "@",
    "#",
    "$",
    "%",
    "^",
    "&",
    "*",
    "+",
    "=",
    "<",
    ">",
    "¿",
    "¡",
    "§",
    "¶",
    "°",
    "·",
    "•",
    "†",
    "‡",
    "‰",
    "′",
    "※",
    "⁂",
    "№",
    "℃",
    "℉",
    "→",
    "⇒",
    "∞",
    "≈",
    "≠",
    "√",
    "∑",
    "┻━┻",
    "(╯°□°）╯︵ ┻━┻",
    "¯\\_(ツ)_/¯",
    "ಠ_ಠ",
    "(｡◕‿◕｡)",
    "ʕ•ᴥ•ʔ",
    "Õ¬Õ",
    "ÔωÔ",
];

const NUMBERS: &[&str] = &[
    "0",
    "7",
    "42",
    "1234567890",
    "3.14159",
    "1,000,000",
    "2024-01-01",
    "+1 (555) 123-4567",
    "٣٤٥",
    "۱۲۳",
    "१२३",
    "๑๒๓",
    "①②③",
    "⑴",
    "½",
    "¼",
    "¾",
    "²",
    "³",
    "¹",
    "⁴",
    "₂",
    "Ⅻ",
    "〇",
    "一二三",
    "𝟙𝟚𝟛",
    "１２３",
    "0x1F",
    "1e-9",
    "1/2",
    "10³",
    "№5",
    "٫",
    "𝟘",
];

/// Texts that ftfy and open_clip handle in specific ways (from ftfy's docs and edge cases).
const FIXED_CASES: &[&str] = &[
    "",
    " ",
    "\n",
    "\t \n \r\n \u{3000}\u{a0}",
    "a photo of a cat",
    "âœ” No problems",
    "&macr;\\_(ã\u{83}\u{84})_/&macr;",
    "Broken text&hellip; it&#x2019;s ﬂubberiﬁc!",
    "ＬＯＵＤ　ＮＯＩＳＥＳ",
    "sÃ³",
    "voilÃ le travail",
    "Ã la mode",
    "Ã  la mode",
    "Ã\u{a0}la mode",
    "Ã quele Ã quela Ã quilo Ã s Ã",
    "fÃ cil",
    "The Mona Lisa doesnâ€™t have eyebrows.",
    "â€œquotedâ€\u{9d}",
    "â€œ like this â€\u{fffd}",
    "Ã¢â‚¬â„¢",
    "Ãƒâ€šÃ‚Â",
    "ÃƒÂ©tÃƒÂ©",
    "Ã©tÃ©",
    "schÃ¶n",
    "P&EACUTE;REZ",
    "this&not that",
    "&ntilde; &Ntilde; &NTILDE; &nTILDE;",
    "&lt;tag&gt;",
    "<b>bold</b> &amp; more",
    "first line &amp; entity\nsecond <line>\nthird &amp; entity",
    "&amp;\n<\n&amp;",
    "\x1b[36;44mI'm blue, da ba dee da ba doo...\x1b[0m",
    "This string is made of two things:\u{2029}1. Unicode\u{2028}2. Spite",
    "What is this \u{85} I don't even",
    "Content-type: text/plain\r\n\r\nHi.",
    "ﬂuﬃeﬆ",
    "Ｕﾀｰﾝ",
    "\u{201c}here\u{2019}s a test\u{201d}",
    "(╯°□°)╯︵ ┻━┻",
    "Ã\u{a0}bientôt",
    "Ã©\u{c0}\n",
    "x\u{ed}\u{a0}\u{bd}\u{ed}\u{b8}\u{80}y",
    "\u{c3}\u{a9}\u{c0}\u{80}",
    "ÐŸÑ€Ð¸Ð²ÐµÑ‚",
    "Ø§Ù„Ø¹Ø±Ø¨ÙŠØ©",
    "Ã¼ber",
    "Ã\u{9c}ber",
    "Ã–sterreich",
    "â€”",
    "â€“",
    "â€¦",
    "Ã\u{83}Â©",
    "вЂ™",
    "ГўВЂВ™s",
    "Î±Î²Î³",
    "√©",
    "‚Äôs",
    "Ã¢â‚¬Å“",
    "Ã¡",
    "Â£100",
    "Â©2020",
    "Â Â",
    "Ã ",
    "Ã",
    "Â",
    "×²",
    "ÙØ±",
    "à²¹",
    "β€™",
    "ā€",
    "œx",
    "Ã°Å¸Ëœâ‚¬",
    "ðŸ˜€",
    "ðŸ‘\u{8d}",
    "Ã°Å¸â€˜\u{8d}",
    "It was ÃƒÂ¼ber Ã¼ber über",
    "The ‚Äúmac roman‚Äù case",
    "lossy Ã?",
    "lossy â€?",
    "lossy ï¿½",
    "\u{fffd}\u{fffd}",
    "Ã\u{fffd}",
    "\u{1a}Ã©",
    "Ã©\u{1a}",
    "<start_of_text>a<end_of_text>",
    "<START_OF_TEXT>",
    "it'ſ fine",
    "ΣΑΣ ΣΑΣ. ΣΑΣ'Σ",
    "İI ıi",
    "Ǆ ǅ ǆ",
    "\u{1e9e}",
    "\u{10d50}\u{10d51} garay",
    "\u{a7cb}\u{a7cc}\u{a7da}\u{a7dc}",
    "x\u{345}",
    "\u{1100}\u{1161}\u{11a8}",
    "\u{11b00}\u{11b01}",
    "\u{16d40}\u{16d41}\u{16d63}\u{16d67}",
    "\u{113c2}\u{113c9}\u{113b8}\u{113c2}",
    "\u{1611e}\u{1611e}\u{16121}",
];

/// GPT-style sloppy windows-1252 for bytes 0x80..=0x9F (undefined bytes as C1 controls).
const CP1252_C1: &str = "\u{20ac}\u{81}\u{201a}\u{192}\u{201e}\u{2026}\u{2020}\u{2021}\u{2c6}\u{2030}\u{160}\u{2039}\u{152}\u{8d}\u{17d}\u{8f}\u{90}\u{2018}\u{2019}\u{201c}\u{201d}\u{2022}\u{2013}\u{2014}\u{2dc}\u{2122}\u{161}\u{203a}\u{153}\u{9d}\u{17e}\u{178}";
const CP1251_HIGH: &str = "\u{402}\u{403}\u{201a}\u{453}\u{201e}\u{2026}\u{2020}\u{2021}\u{20ac}\u{2030}\u{409}\u{2039}\u{40a}\u{40c}\u{40b}\u{40f}\u{452}\u{2018}\u{2019}\u{201c}\u{201d}\u{2022}\u{2013}\u{2014}\u{fffd}\u{2122}\u{459}\u{203a}\u{45a}\u{45c}\u{45b}\u{45f}\u{a0}\u{40e}\u{45e}\u{408}\u{a4}\u{490}\u{a6}\u{a7}\u{401}\u{a9}\u{404}\u{ab}\u{ac}\u{ad}\u{ae}\u{407}\u{b0}\u{b1}\u{406}\u{456}\u{491}\u{b5}\u{b6}\u{b7}\u{451}\u{2116}\u{454}\u{bb}\u{458}\u{405}\u{455}\u{457}\u{410}\u{411}\u{412}\u{413}\u{414}\u{415}\u{416}\u{417}\u{418}\u{419}\u{41a}\u{41b}\u{41c}\u{41d}\u{41e}\u{41f}\u{420}\u{421}\u{422}\u{423}\u{424}\u{425}\u{426}\u{427}\u{428}\u{429}\u{42a}\u{42b}\u{42c}\u{42d}\u{42e}\u{42f}\u{430}\u{431}\u{432}\u{433}\u{434}\u{435}\u{436}\u{437}\u{438}\u{439}\u{43a}\u{43b}\u{43c}\u{43d}\u{43e}\u{43f}\u{440}\u{441}\u{442}\u{443}\u{444}\u{445}\u{446}\u{447}\u{448}\u{449}\u{44a}\u{44b}\u{44c}\u{44d}\u{44e}\u{44f}";
const CP1250_HIGH: &str = "\u{20ac}\u{fffd}\u{201a}\u{fffd}\u{201e}\u{2026}\u{2020}\u{2021}\u{fffd}\u{2030}\u{160}\u{2039}\u{15a}\u{164}\u{17d}\u{179}\u{fffd}\u{2018}\u{2019}\u{201c}\u{201d}\u{2022}\u{2013}\u{2014}\u{fffd}\u{2122}\u{161}\u{203a}\u{15b}\u{165}\u{17e}\u{17a}\u{a0}\u{2c7}\u{2d8}\u{141}\u{a4}\u{104}\u{a6}\u{a7}\u{a8}\u{a9}\u{15e}\u{ab}\u{ac}\u{ad}\u{ae}\u{17b}\u{b0}\u{b1}\u{2db}\u{142}\u{b4}\u{b5}\u{b6}\u{b7}\u{b8}\u{105}\u{15f}\u{bb}\u{13d}\u{2dd}\u{13e}\u{17c}\u{154}\u{c1}\u{c2}\u{102}\u{c4}\u{139}\u{106}\u{c7}\u{10c}\u{c9}\u{118}\u{cb}\u{11a}\u{cd}\u{ce}\u{10e}\u{110}\u{143}\u{147}\u{d3}\u{d4}\u{150}\u{d6}\u{d7}\u{158}\u{16e}\u{da}\u{170}\u{dc}\u{dd}\u{162}\u{df}\u{155}\u{e1}\u{e2}\u{103}\u{e4}\u{13a}\u{107}\u{e7}\u{10d}\u{e9}\u{119}\u{eb}\u{11b}\u{ed}\u{ee}\u{10f}\u{111}\u{144}\u{148}\u{f3}\u{f4}\u{151}\u{f6}\u{f7}\u{159}\u{16f}\u{fa}\u{171}\u{fc}\u{fd}\u{163}\u{2d9}";
const MACROMAN_HIGH: &str = "\u{c4}\u{c5}\u{c7}\u{c9}\u{d1}\u{d6}\u{dc}\u{e1}\u{e0}\u{e2}\u{e4}\u{e3}\u{e5}\u{e7}\u{e9}\u{e8}\u{ea}\u{eb}\u{ed}\u{ec}\u{ee}\u{ef}\u{f1}\u{f3}\u{f2}\u{f4}\u{f6}\u{f5}\u{fa}\u{f9}\u{fb}\u{fc}\u{2020}\u{b0}\u{a2}\u{a3}\u{a7}\u{2022}\u{b6}\u{df}\u{ae}\u{a9}\u{2122}\u{b4}\u{a8}\u{2260}\u{c6}\u{d8}\u{221e}\u{b1}\u{2264}\u{2265}\u{a5}\u{b5}\u{2202}\u{2211}\u{220f}\u{3c0}\u{222b}\u{aa}\u{ba}\u{3a9}\u{e6}\u{f8}\u{bf}\u{a1}\u{ac}\u{221a}\u{192}\u{2248}\u{2206}\u{ab}\u{bb}\u{2026}\u{a0}\u{c0}\u{c3}\u{d5}\u{152}\u{153}\u{2013}\u{2014}\u{201c}\u{201d}\u{2018}\u{2019}\u{f7}\u{25ca}\u{ff}\u{178}\u{2044}\u{20ac}\u{2039}\u{203a}\u{fb01}\u{fb02}\u{2021}\u{b7}\u{201a}\u{201e}\u{2030}\u{c2}\u{ca}\u{c1}\u{cb}\u{c8}\u{cd}\u{ce}\u{cf}\u{cc}\u{d3}\u{d4}\u{f8ff}\u{d2}\u{da}\u{db}\u{d9}\u{131}\u{2c6}\u{2dc}\u{af}\u{2d8}\u{2d9}\u{2da}\u{b8}\u{2dd}\u{2db}\u{2c7}";
const CP437_HIGH: &str = "\u{c7}\u{fc}\u{e9}\u{e2}\u{e4}\u{e0}\u{e5}\u{e7}\u{ea}\u{eb}\u{e8}\u{ef}\u{ee}\u{ec}\u{c4}\u{c5}\u{c9}\u{e6}\u{c6}\u{f4}\u{f6}\u{f2}\u{fb}\u{f9}\u{ff}\u{d6}\u{dc}\u{a2}\u{a3}\u{a5}\u{20a7}\u{192}\u{e1}\u{ed}\u{f3}\u{fa}\u{f1}\u{d1}\u{aa}\u{ba}\u{bf}\u{2310}\u{ac}\u{bd}\u{bc}\u{a1}\u{ab}\u{bb}\u{2591}\u{2592}\u{2593}\u{2502}\u{2524}\u{2561}\u{2562}\u{2556}\u{2555}\u{2563}\u{2551}\u{2557}\u{255d}\u{255c}\u{255b}\u{2510}\u{2514}\u{2534}\u{252c}\u{251c}\u{2500}\u{253c}\u{255e}\u{255f}\u{255a}\u{2554}\u{2569}\u{2566}\u{2560}\u{2550}\u{256c}\u{2567}\u{2568}\u{2564}\u{2565}\u{2559}\u{2558}\u{2552}\u{2553}\u{256b}\u{256a}\u{2518}\u{250c}\u{2588}\u{2584}\u{258c}\u{2590}\u{2580}\u{3b1}\u{df}\u{393}\u{3c0}\u{3a3}\u{3c3}\u{b5}\u{3c4}\u{3a6}\u{398}\u{3a9}\u{3b4}\u{221e}\u{3c6}\u{3b5}\u{2229}\u{2261}\u{b1}\u{2265}\u{2264}\u{2320}\u{2321}\u{f7}\u{2248}\u{b0}\u{2219}\u{b7}\u{221a}\u{207f}\u{b2}\u{25a0}\u{a0}";

/// Code point ranges for "random Unicode soup": scripts, symbols, combining marks, case
/// oddities, compatibility forms, characters newer than Python 3.11's Unicode 14, private use,
/// unassigned and noncharacters.
const RANGES: &[(u32, u32)] = &[
    (0x20, 0x7e),
    (0xa0, 0x24f),
    (0x250, 0x2ff),
    (0x300, 0x36f),
    (0x370, 0x3ff),
    (0x400, 0x52f),
    (0x530, 0x58f),
    (0x590, 0x5ff),
    (0x600, 0x6ff),
    (0x700, 0x7ff),
    (0x900, 0xdff),
    (0xe00, 0xeff),
    (0x10a0, 0x10ff),
    (0x1100, 0x11ff),
    (0x13a0, 0x13ff),
    (0x1c80, 0x1c8f),
    (0x1d00, 0x1dff),
    (0x1e00, 0x1fff),
    (0x2000, 0x206f),
    (0x2070, 0x20cf),
    (0x2100, 0x218f),
    (0x2190, 0x23ff),
    (0x2460, 0x24ff),
    (0x2500, 0x25ff),
    (0x2600, 0x27bf),
    (0x2c00, 0x2c7f),
    (0x2d00, 0x2d2f),
    (0x2e80, 0x2fff),
    (0x3000, 0x30ff),
    (0x3130, 0x31ff),
    (0x3200, 0x33ff),
    (0x4e00, 0x4eff),
    (0xa640, 0xa69f),
    (0xa720, 0xa7ff),
    (0xab70, 0xabbf),
    (0xac00, 0xac7f),
    (0xd7b0, 0xd7ff),
    (0xe000, 0xe00f),
    (0xf900, 0xf9ff),
    (0xfb00, 0xfb4f),
    (0xfdd0, 0xfdef),
    (0xfe00, 0xfe6f),
    (0xff00, 0xffff),
    (0x10000, 0x1007f),
    (0x10400, 0x1044f),
    (0x10570, 0x105bf),
    (0x10c80, 0x10cff),
    (0x10d40, 0x10d8f),
    (0x11380, 0x113ff),
    (0x11b00, 0x11b0f),
    (0x16100, 0x1613f),
    (0x16d40, 0x16d7f),
    (0x16e40, 0x16e9f),
    (0x1d400, 0x1d7ff),
    (0x1e900, 0x1e95f),
    (0x1f000, 0x1faff),
    (0x1fb00, 0x1fbff),
    (0x20000, 0x2007f),
    (0x2ebf0, 0x2ee5f),
    (0x31350, 0x323af),
    (0xe0000, 0xe007f),
    (0xe0100, 0xe01ef),
    (0xf0000, 0xf000f),
    (0x10fff0, 0x10ffff),
];

struct Gen {
    rng: ChaCha8Rng,
}

impl Gen {
    fn pick<'a>(&mut self, list: &[&'a str]) -> &'a str {
        list.choose(&mut self.rng).copied().unwrap_or("")
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.gen_bool(p)
    }

    fn random_char(&mut self) -> char {
        loop {
            let &(lo, hi) = RANGES.choose(&mut self.rng).unwrap_or(&(0x20, 0x7e));
            if let Some(c) = char::from_u32(self.rng.gen_range(lo..=hi)) {
                return c;
            }
        }
    }

    fn soup(&mut self, n: usize) -> String {
        (0..n).map(|_| self.random_char()).collect()
    }

    fn soup_upto(&mut self, max: usize) -> String {
        let n = self.rng.gen_range(1..max);
        self.soup(n)
    }

    /// Random strings over the characters mojibake is made of (Latin-1's upper half, the
    /// windows-1252 extras, Greek, Cyrillic, box drawing, a few symbols), with ASCII letters,
    /// spaces and '?': they hit ftfy's badness rules and its UTF-8 detector in odd combinations.
    fn mojibake_soup(&mut self) -> String {
        const EXTRA: &str = "€‚ƒ„…†‡ˆ‰Š‹ŒŽ‘’“”•–—˜™š›œžŸ\u{81}\u{8d}\u{8f}\u{90}\u{9d}\u{fffd}\u{1a}ΑΒΓΔΞΟΣαβγσςВГРСЂЃђўа═║╬│┌▀▄█√≈∞≤≥≠ΩπĂăĄąĆćČčĐđĘęĞğİıŁłŃńŐőŘřŚśŞşŠšŢţŤťŮůŰűŸŹźŻżŽžˇ˘˙˛˝ā";
        let extra: Vec<char> = EXTRA.chars().collect();
        let n = self.rng.gen_range(1..16);
        (0..n)
            .map(|_| match self.rng.gen_range(0..10) {
                0..=3 => char::from_u32(self.rng.gen_range(0xa0..=0xff)).unwrap_or('a'),
                4..=6 => *extra.choose(&mut self.rng).unwrap_or(&'a'),
                7 => ' ',
                8 => *['a', 'e', 's', 'x', 'A', 'Z', '?', '.', '\n']
                    .choose(&mut self.rng)
                    .unwrap_or(&'a'),
                _ => char::from_u32(self.rng.gen_range(0x80..=0x9f)).unwrap_or('a'),
            })
            .collect()
    }

    fn caption(&mut self) -> String {
        let n = self.rng.gen_range(1..14);
        let mut words: Vec<String> = (0..n).map(|_| self.pick(WORDS).to_string()).collect();
        if self.chance(0.3) {
            if let Some(w) = words.first_mut() {
                let mut c = w.chars();
                if let Some(f) = c.next() {
                    *w = f.to_uppercase().collect::<String>() + c.as_str();
                }
            }
        }
        if self.chance(0.1) {
            for w in &mut words {
                *w = w.to_uppercase();
            }
        }
        let mut s = words.join(" ");
        if self.chance(0.5) {
            s.push_str(self.pick(&[".", "!", "?", "...", ",", ";", ":", " :)", " :-(", "!!"]));
        }
        s
    }

    fn multilingual(&mut self) -> String {
        let n = self.rng.gen_range(1..6);
        let mut parts = Vec::new();
        for _ in 0..n {
            parts.push(if self.chance(0.7) {
                self.pick(INTL).to_string()
            } else {
                self.pick(WORDS).to_string()
            });
        }
        let sep = self.pick(&[" ", " ", ", ", "", "-", "\u{a0}", "\u{3000}"]);
        parts.join(sep)
    }

    /// Decode UTF-8 bytes with a single-byte table (0x80..=0xFF), as a misconfigured program would.
    fn mis_decode(bytes: &[u8], high: &[char], undefined: Option<char>) -> String {
        bytes
            .iter()
            .map(|&b| {
                if b < 0x80 {
                    b as char
                } else {
                    let c = high[(b - 0x80) as usize];
                    if c == '\u{fffd}' {
                        undefined.unwrap_or(char::from(b))
                    } else {
                        c
                    }
                }
            })
            .collect()
    }

    fn mojibake(&mut self) -> String {
        let source = match self.rng.gen_range(0..6) {
            0 => self.multilingual(),
            1 => format!("{} {}", self.caption(), self.pick(EMOJI)),
            2 => format!(
                "{}{}{}",
                self.pick(QUOTES),
                self.caption(),
                self.pick(PUNCT)
            ),
            3 => self.pick(INTL).to_string(),
            4 => format!(
                "{} {} {}",
                self.pick(WORDS),
                self.pick(INTL),
                self.pick(WORDS)
            ),
            _ => self.soup_upto(6),
        };
        let latin1: Vec<char> = (0x80u32..0x100).filter_map(char::from_u32).collect();
        let cp1252: Vec<char> = CP1252_C1
            .chars()
            .chain((0xa0u32..0x100).filter_map(char::from_u32))
            .collect();
        let cp1251: Vec<char> = CP1251_HIGH.chars().collect();
        let cp1250: Vec<char> = CP1250_HIGH.chars().collect();
        let macroman: Vec<char> = MACROMAN_HIGH.chars().collect();
        let cp437: Vec<char> = CP437_HIGH.chars().collect();
        let table_pick = self.rng.gen_range(0..10);
        let (table, undefined): (&[char], Option<char>) = match table_pick {
            0..=1 => (&latin1, None),
            2..=5 => (&cp1252, None),
            6 => (&cp1251, None),
            7 => (&cp1250, Some('\u{fffd}')),
            8 => (&macroman, None),
            _ => (&cp437, None),
        };
        let mut text = Self::mis_decode(source.as_bytes(), table, undefined);
        if self.chance(0.2) {
            // Twice: the mojibake itself re-encoded as UTF-8 and mis-decoded again.
            text = Self::mis_decode(text.as_bytes(), table, undefined);
        }
        if self.chance(0.15) {
            // Lossy: bytes a strict windows-1252 decoder rejects became U+FFFD.
            text = text
                .chars()
                .map(|c| {
                    if matches!(c as u32, 0x81 | 0x8d | 0x8f | 0x90 | 0x9d) {
                        '\u{fffd}'
                    } else {
                        c
                    }
                })
                .collect();
        }
        if self.chance(0.15) {
            // A web pipeline turned NO-BREAK SPACE into a space.
            text = text.replace('\u{a0}', " ");
        }
        if self.chance(0.1) {
            text = text.replace('\u{fffd}', "?");
        }
        if self.chance(0.3) {
            // Inconsistent: mojibake next to correct text.
            let clean = self.multilingual();
            text = if self.chance(0.5) {
                format!("{clean} {text}")
            } else {
                format!("{text} — {clean}")
            };
        }
        text
    }

    fn html(&mut self) -> String {
        let n = self.rng.gen_range(1..5);
        let mut s = String::new();
        for _ in 0..n {
            if self.chance(0.6) {
                s.push_str(&self.caption());
            }
            s.push_str(self.pick(&[" ", "", " ", "x"]));
            s.push_str(self.pick(ENTITIES));
            s.push_str(self.pick(&[" ", "", "y", ";"]));
        }
        if self.chance(0.2) {
            s.push_str(self.pick(&["<br>", "\n<p>", "<", "\n"]));
            s.push_str(self.pick(ENTITIES));
        }
        s
    }

    fn controls(&mut self) -> String {
        let n = self.rng.gen_range(1..6);
        let mut s = String::new();
        for _ in 0..n {
            if self.chance(0.7) {
                s.push_str(&self.caption());
            }
            s.push_str(self.pick(CONTROLS));
            if self.chance(0.3) {
                s.push_str(self.pick(SPACES));
            }
        }
        s
    }

    fn whitespace_only(&mut self) -> String {
        let n = self.rng.gen_range(0..8);
        (0..n).map(|_| self.pick(SPACES)).collect()
    }

    fn punct_numbers(&mut self) -> String {
        let n = self.rng.gen_range(1..8);
        let mut s = String::new();
        for _ in 0..n {
            let piece = match self.rng.gen_range(0..4) {
                0 => self.pick(PUNCT),
                1 => self.pick(NUMBERS),
                2 => self.pick(WORDS),
                _ => self.pick(SPACES),
            };
            s.push_str(piece);
            if self.chance(0.4) {
                s.push(' ');
            }
        }
        s
    }

    fn styled(&mut self) -> String {
        // Curly quotes, ligatures, fullwidth and halfwidth forms mixed into captions.
        let c = self.caption();
        let mut s = String::new();
        for ch in c.chars() {
            let r: f64 = self.rng.gen();
            if r < 0.1 && ch.is_ascii_graphic() {
                // fullwidth ASCII
                s.push(char::from_u32(ch as u32 - 0x21 + 0xff01).unwrap_or(ch));
            } else if r < 0.13 && ch == ' ' {
                s.push('\u{3000}');
            } else if r < 0.3 && ch == '\'' {
                s.push(*['’', '‘', 'ʼ', '‛'].choose(&mut self.rng).unwrap_or(&'\''));
            } else {
                s.push(ch);
            }
        }
        let extra = match self.rng.gen_range(0..4) {
            0 => self.pick(QUOTES),
            1 => self.pick(&[
                "ﬁ", "ﬂ", "ﬀ", "ﬃ", "ﬄ", "ﬅ", "ﬆ", "Ĳ", "ĳ", "ŉ", "Ǳ", "ǲ", "ǳ", "Ǆ", "ǅ", "ǆ",
                "Ǉ", "ǈ", "ǉ", "Ǌ", "ǋ", "ǌ",
            ]),
            2 => self.pick(&[
                "ｶﾀｶﾅ",
                "ﾊﾟﾝ",
                "ｶﾞ",
                "ﾞ",
                "ﾟ",
                "ＡＢＣ",
                "ｈｅｌｌｏ",
                "１２３",
                "￥",
                "￡",
                "＄",
                "ﾠ",
                "ￂ",
                "ￜ",
                "￨",
                "￮",
            ]),
            _ => self.pick(EMOJI),
        };
        let at = self.rng.gen_range(0..=s.chars().count());
        let byte_at = s.char_indices().nth(at).map_or(s.len(), |(i, _)| i);
        s.insert_str(byte_at, extra);
        s
    }

    fn long(&mut self) -> String {
        let target = *[200usize, 400, 1200, 3000, 8000]
            .choose(&mut self.rng)
            .unwrap_or(&400);
        let mut s = String::new();
        while s.chars().count() < target {
            let piece = match self.rng.gen_range(0..6) {
                0 => self.mojibake(),
                1 => self.html(),
                2 => self.multilingual(),
                3 => self.pick(EMOJI).to_string(),
                _ => self.caption(),
            };
            s.push_str(&piece);
            s.push_str(self.pick(&[" ", " ", "\n", ". ", "\r\n", " | "]));
        }
        s
    }

    fn mixture(&mut self) -> String {
        let n = self.rng.gen_range(1..6);
        let mut s = String::new();
        for _ in 0..n {
            let piece = match self.rng.gen_range(0..10) {
                0 => self.caption(),
                1 => self.multilingual(),
                2 => self.mojibake(),
                3 => self.html(),
                4 => self.controls(),
                5 => self.punct_numbers(),
                6 => self.styled(),
                7 => self.pick(EMOJI).to_string(),
                8 => self.soup_upto(12),
                _ => self.pick(FIXED_CASES).to_string(),
            };
            s.push_str(&piece);
            s.push_str(self.pick(SPACES));
        }
        s
    }
}

/// The parity corpus: hand-picked cases, then seeded generated strings by category.
fn corpus() -> Vec<String> {
    // HQ_TOKENIZER_PARITY_SEED=<n> runs the same generator with another seed (for fuzzing).
    let seed = std::env::var("HQ_TOKENIZER_PARITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEED);
    let mut g = Gen {
        rng: ChaCha8Rng::seed_from_u64(seed),
    };
    let mut out: Vec<String> = FIXED_CASES.iter().map(|s| s.to_string()).collect();
    type Maker = fn(&mut Gen) -> String;
    let plan: &[(usize, Maker)] = &[
        (1500, Gen::caption),
        (800, Gen::html),
        (700, |g| {
            let n = g.rng.gen_range(1..5);
            let mut s = g.caption();
            for _ in 0..n {
                s.push_str(g.pick(&[" ", "", "\u{200d}", "\u{fe0f}"]));
                s.push_str(g.pick(EMOJI));
            }
            s
        }),
        (1200, Gen::multilingual),
        (2200, Gen::mojibake),
        (1000, Gen::mojibake_soup),
        (700, Gen::styled),
        (700, Gen::controls),
        (250, Gen::long),
        (100, Gen::whitespace_only),
        (700, Gen::punct_numbers),
        (1500, |g| {
            let n = g.rng.gen_range(1..24);
            g.soup(n)
        }),
        (2000, Gen::mixture),
    ];
    for &(count, f) in plan {
        for _ in 0..count {
            out.push(f(&mut g));
        }
    }
    // One text longer than ftfy's max_decode_length (1,000,000 code points), with mojibake on both
    // sides of the cut.
    let mut huge = "ab".repeat(499_995);
    huge.push_str("caf\u{c3}\u{a9} Ã©tÃ© ");
    huge.push_str(&"xy ".repeat(40));
    out.push(huge);
    out
}

/// Run the Python reference on `texts` with `context_length`; one JSON object per text.
fn reference(texts: &[String], context_length: usize, dir: &Path) -> Vec<serde_json::Value> {
    let input = dir.join(format!("texts_{context_length}.jsonl"));
    let output = dir.join(format!("reference_{context_length}.jsonl"));
    {
        let mut f = match std::fs::File::create(&input) {
            Ok(f) => std::io::BufWriter::new(f),
            Err(e) => panic!("create {}: {e}", input.display()),
        };
        for t in texts {
            let line = serde_json::to_string(t).unwrap_or_default();
            if let Err(e) = writeln!(f, "{line}") {
                panic!("write {}: {e}", input.display());
            }
        }
        if let Err(e) = f.flush() {
            panic!("write {}: {e}", input.display());
        }
    }
    // Keep a copy of the full corpus for debugging when asked to.
    if let Some(dump) =
        std::env::var_os("HQ_TOKENIZER_PARITY_DUMP").filter(|_| context_length == 77)
    {
        if let Err(e) = std::fs::copy(&input, &dump) {
            eprintln!("cannot copy the corpus to {dump:?}: {e}");
        }
    }

    let script = workspace_root().join("tests/python/tokenizer_reference.py");
    let py = python();
    let status = Command::new(&py)
        .arg(&script)
        .arg(&input)
        .arg(&output)
        .arg("--context-length")
        .arg(context_length.to_string())
        .env("HF_HUB_OFFLINE", "1")
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{} {} failed: {s}", py.display(), script.display()),
        Err(e) => panic!(
            "cannot run {} (set HQ_PYTHON or run `source tools/env.sh`): {e}",
            py.display()
        ),
    }
    let text = match std::fs::read_to_string(&output) {
        Ok(s) => s,
        Err(e) => panic!("read {}: {e}", output.display()),
    };
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or(serde_json::Value::Null))
        .collect();
    assert_eq!(
        rows.len(),
        texts.len(),
        "reference output has the wrong length"
    );
    rows
}

struct Tally {
    matched: usize,
    python_errors: usize,
    clean_mismatches: usize,
}

/// Compare our rows with the reference rows, printing the first mismatches.
fn compare(texts: &[String], ours: &[Vec<i64>], rows: &[serde_json::Value]) -> Tally {
    let mut tally = Tally {
        matched: 0,
        python_errors: 0,
        clean_mismatches: 0,
    };
    let mut shown = 0usize;
    let shorten = |s: &str| -> String {
        if s.chars().count() > 300 {
            s.chars().take(300).collect::<String>() + "…"
        } else {
            s.to_string()
        }
    };
    let trim = |v: &[i64]| -> Vec<i64> {
        let end = v.iter().rposition(|&x| x != 0).map_or(0, |p| p + 1);
        v[..end].to_vec()
    };
    for (i, (text, row)) in texts.iter().zip(rows).enumerate() {
        let theirs: Option<Vec<i64>> = row
            .get("ids")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().map(|x| x.as_i64().unwrap_or(-1)).collect());
        let Some(theirs) = theirs else {
            tally.python_errors += 1;
            if shown < 10 {
                shown += 1;
                eprintln!("#{i}: open_clip raised {:?} on {text:?}", row.get("error"));
            }
            continue;
        };
        let their_clean = row.get("clean").and_then(|v| v.as_str()).unwrap_or("");
        let our_clean = ClipTokenizer::clean(text);
        if our_clean != their_clean {
            tally.clean_mismatches += 1;
        }
        if ours[i] == theirs {
            tally.matched += 1;
        } else if shown < 10 {
            shown += 1;
            eprintln!(
                "#{i} MISMATCH\n  text:  {:?}\n  ours:  {:?}\n  theirs:{:?}\n  our clean:   {:?}\n  their clean: {:?}",
                shorten(text),
                trim(&ours[i]),
                trim(&theirs),
                shorten(&our_clean),
                shorten(their_clean)
            );
        }
    }
    tally
}

#[test]
fn tokenizer_matches_open_clip() {
    let texts = corpus();
    assert!(texts.len() >= 10_000);
    let tokenizer = match ClipTokenizer::from_bundled() {
        Ok(t) => t,
        Err(e) => panic!("cannot load the bundled tokenizer: {e}"),
    };
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("tempdir: {e}"),
    };

    // The default context length (77), on the whole corpus.
    let rows = reference(&texts, 77, dir.path());
    let ours = match tokenizer.tokenize_batch(&texts) {
        Ok(v) => v,
        Err(e) => panic!("tokenize_batch: {e}"),
    };
    let t = compare(&texts, &ours, &rows);
    eprintln!(
        "tokenizer parity (context 77): {}/{} strings give identical ids ({} open_clip errors, {} cleaned-text differences)",
        t.matched,
        texts.len(),
        t.python_errors,
        t.clean_mismatches
    );
    assert_eq!(
        t.python_errors, 0,
        "open_clip raised on some generated strings"
    );
    assert_eq!(
        t.clean_mismatches, 0,
        "cleaned texts differ from open_clip's"
    );
    assert_eq!(t.matched, texts.len(), "ids differ from open_clip's");

    // A short context length, where most strings are truncated, on part of the corpus.
    let subset: Vec<String> = texts.iter().step_by(5).cloned().collect();
    let short = match ClipTokenizer::from_bundled().and_then(|t| t.with_context_length(12)) {
        Ok(t) => t,
        Err(e) => panic!("tokenizer with context 12: {e}"),
    };
    let rows = reference(&subset, 12, dir.path());
    let ours = match short.tokenize_batch(&subset) {
        Ok(v) => v,
        Err(e) => panic!("tokenize_batch: {e}"),
    };
    let t = compare(&subset, &ours, &rows);
    eprintln!(
        "tokenizer parity (context 12): {}/{} strings give identical ids",
        t.matched,
        subset.len()
    );
    assert_eq!(
        t.matched,
        subset.len(),
        "ids differ from open_clip's at context length 12"
    );
}

/// Runs `tests/python/hf_tokenizer_reference.py` with `args` (env.sh sets `HF_HUB_OFFLINE`).
fn hf_script(args: &[&std::ffi::OsStr]) {
    hq_tests::run_python_script(&python(), "hf_tokenizer_reference.py", args);
}

/// `HfTokenizer` against open_clip's `HFTokenizer` on a WordPiece tokenizer folder built by
/// transformers: CLIPA's settings (context 32, `strip_sep_token`, whitespace clean) and a short
/// context with lower-casing clean-up, on a fifth of the adversarial corpus.
#[test]
fn hf_tokenizer_matches_open_clips_hf_tokenizer() {
    use hq_data::text::hf_tokenizer::{HfTokenizer, HfTokenizerOptions, TextClean};
    let texts: Vec<String> = corpus()
        .into_iter()
        .step_by(5)
        .filter(|t| t.len() < 100_000)
        .collect();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let folder = dir.path().join("wordpiece");
    hf_script(&["make".as_ref(), folder.as_os_str()]);
    let input = dir.path().join("texts.jsonl");
    let lines: Vec<String> = texts
        .iter()
        .map(|t| serde_json::to_string(t).unwrap_or_default())
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap_or_else(|e| panic!("write: {e}"));
    for (context_length, strip_sep_token, clean) in [
        (32, true, TextClean::Whitespace),
        (12, false, TextClean::Lower),
    ] {
        let output = dir.path().join(format!("reference_{context_length}.jsonl"));
        let clean_arg = match clean {
            TextClean::Whitespace => "whitespace",
            TextClean::Lower => "lower",
        };
        let ctx = context_length.to_string();
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "reference".as_ref(),
            folder.as_os_str(),
            input.as_os_str(),
            output.as_os_str(),
            "--context-length".as_ref(),
            ctx.as_ref(),
            "--clean".as_ref(),
            clean_arg.as_ref(),
        ];
        if strip_sep_token {
            args.push("--strip-sep-token".as_ref());
        }
        hf_script(&args);
        let options = HfTokenizerOptions {
            context_length,
            clean,
            strip_sep_token,
        };
        let ours = HfTokenizer::from_folder(&folder, options)
            .unwrap_or_else(|e| panic!("load: {e}"))
            .tokenize_batch_flat(&texts)
            .unwrap_or_else(|e| panic!("tokenize: {e}"));
        let rows = std::fs::read_to_string(&output).unwrap_or_else(|e| panic!("read: {e}"));
        let mut matched = 0;
        let mut shown = 0;
        for (i, (line, text)) in rows.lines().zip(&texts).enumerate() {
            let row: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
            let theirs: Vec<i64> = row["ids"]
                .as_array()
                .unwrap_or_else(|| panic!("#{i}: open_clip raised {:?} on {text:?}", row["error"]))
                .iter()
                .map(|x| x.as_i64().unwrap_or(-1))
                .collect();
            let mine = &ours[i * context_length..(i + 1) * context_length];
            if mine == theirs.as_slice() {
                matched += 1;
            } else if shown < 10 {
                shown += 1;
                eprintln!("#{i} MISMATCH {text:?}\n  ours:   {mine:?}\n  theirs: {theirs:?}");
            }
        }
        eprintln!(
            "HF tokenizer parity (context {context_length}, strip_sep_token {strip_sep_token}, \
             clean {clean_arg}): {matched}/{} strings give identical ids",
            texts.len()
        );
        assert_eq!(
            matched,
            texts.len(),
            "ids differ from open_clip's HFTokenizer"
        );
    }
}
