//! A server-sent events reader for streams that arrive in pieces: bytes are
//! buffered and cut into lines before they are decoded, so a character that
//! the sender's writes split in two is whole again, and an event split over
//! many network frames comes out once. Lines end in `\n`, `\r\n` or `\r`;
//! several `data:` lines join with `\n`; comments (`:`) and fields other than
//! `event`, `data` and `id` are skipped (the WHATWG event-stream rules).

/// One dispatched event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// The `event:` field; empty for the default ("message").
    pub event: String,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
    pub id: Option<String>,
}

/// The stream ended in the middle of an event: what was pending.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the stream ended in the middle of an event ({pending} bytes of it had arrived)")]
pub struct Unfinished {
    pub pending: usize,
}

#[derive(Debug, Default)]
pub struct Reader {
    /// Bytes of the line not yet ended.
    line: Vec<u8>,
    /// The last byte seen was `\r`: a `\n` right after it belongs to it.
    after_cr: bool,
    /// Nothing dispatched or read yet: a leading byte-order mark is dropped.
    started: bool,
    event: String,
    data: String,
    has_data: bool,
    id: Option<String>,
    /// Bytes of the event being read (fields, comments excluded).
    pending: usize,
    comments: usize,
}

impl Reader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Comment lines seen so far (keep-alives, usually).
    pub fn comments(&self) -> usize {
        self.comments
    }

    /// The events that `bytes` completes, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Event> {
        let mut out = vec![];
        let mut start = 0;
        for (i, &b) in bytes.iter().enumerate() {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    start = i + 1;
                    continue;
                }
            }
            if b == b'\n' || b == b'\r' {
                self.line.extend_from_slice(&bytes[start..i]);
                self.after_cr = b == b'\r';
                start = i + 1;
                let line = std::mem::take(&mut self.line);
                if let Some(e) = self.line_done(&line) {
                    out.push(e);
                }
            }
        }
        self.line.extend_from_slice(&bytes[start..]);
        out
    }

    /// The stream is over: an event begun but not ended is an error (the
    /// rules say to drop it; a proxy must say so instead).
    pub fn finish(&self) -> Result<(), Unfinished> {
        let pending = self.pending + self.line.len();
        if pending > 0 {
            Err(Unfinished { pending })
        } else {
            Ok(())
        }
    }

    fn line_done(&mut self, line: &[u8]) -> Option<Event> {
        let mut line = line;
        if !self.started {
            self.started = true;
            line = line.strip_prefix("\u{feff}".as_bytes()).unwrap_or(line);
        }
        if line.is_empty() {
            return self.dispatch();
        }
        if line[0] == b':' {
            self.comments += 1;
            return None;
        }
        // Lines end only at ASCII bytes, so no character is cut here.
        let text = String::from_utf8_lossy(line);
        let (field, value) = match text.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (&*text, ""),
        };
        self.pending += line.len() + 1;
        match field {
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.event = value.to_string(),
            "id" if !value.contains('\0') => self.id = Some(value.to_string()),
            _ => {}
        }
        None
    }

    fn dispatch(&mut self) -> Option<Event> {
        self.pending = 0;
        let event = std::mem::take(&mut self.event);
        if !std::mem::take(&mut self.has_data) {
            return None;
        }
        Some(Event { event, data: std::mem::take(&mut self.data), id: self.id.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all(frames: &[&[u8]]) -> (Vec<Event>, Result<(), Unfinished>) {
        let mut r = Reader::new();
        let events = frames.iter().flat_map(|f| r.push(f)).collect();
        (events, r.finish())
    }

    fn data(events: &[Event]) -> Vec<&str> {
        events.iter().map(|e| e.data.as_str()).collect()
    }

    #[test]
    fn a_character_split_across_frames_arrives_whole() {
        let bytes = "data: {\"t\": \"東京は日本の首都です。\"}\n\n".as_bytes();
        // 東 is three bytes; cut inside it.
        let cut = bytes.iter().position(|&b| b >= 0x80).unwrap() + 1;
        let (events, end) = all(&[&bytes[..cut], &bytes[cut..]]);
        assert_eq!(data(&events), ["{\"t\": \"東京は日本の首都です。\"}"]);
        assert_eq!(end, Ok(()));
    }

    #[test]
    fn line_ends_multi_line_data_comments_and_fields() {
        let s = b": keep-alive\r\n\r\nevent: ping\r\ndata: a\r\ndata:b\r\ndata:  c\r\n\r\nid: 7\rdata: x\r\rdata\n\n: done\n";
        let (events, end) = all(&[s]);
        assert_eq!(
            events,
            [
                Event { event: "ping".into(), data: "a\nb\n c".into(), id: None },
                Event { event: "".into(), data: "x".into(), id: Some("7".into()) },
                Event { event: "".into(), data: "".into(), id: Some("7".into()) },
            ]
        );
        assert_eq!(end, Ok(()));
        let mut r = Reader::new();
        r.push(s);
        assert_eq!(r.comments(), 2);
    }

    #[test]
    fn a_cr_lf_split_between_frames_is_one_line_end() {
        let (events, _) = all(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]);
        assert_eq!(data(&events), ["a\nb"]);
    }

    #[test]
    fn an_event_without_its_blank_line_is_unfinished() {
        let (events, end) = all(&[b"data: {\"a\": 1}\n\ndata: {\"b\""]);
        assert_eq!(data(&events), ["{\"a\": 1}"]);
        assert_eq!(end, Err(Unfinished { pending: 10 }));
        let (_, end) = all(&[b"data: x\n"]);
        assert!(end.is_err(), "a data line with no blank line after it is not an event yet");
        let (_, end) = all(&[b"data: x\n\n: bye\n"]);
        assert_eq!(end, Ok(()), "a comment after the last event ends nothing");
    }

    #[test]
    fn a_leading_byte_order_mark_is_dropped() {
        let (events, _) = all(&["\u{feff}data: a\n\n".as_bytes()]);
        assert_eq!(data(&events), ["a"]);
    }

    /// One event's data lines, as arbitrary text (multi-byte characters,
    /// colons, leading spaces) without line breaks.
    fn event_lines() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec("[a-z :{}\"é東😀\u{3000}]{0,12}", 1..4)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Any split of a valid stream into frames yields the same events,
        /// and they are the events that were written.
        #[test]
        fn any_split_gives_the_same_events(
            events in prop::collection::vec(event_lines(), 0..6),
            // One line end for the whole stream: a writer that mixed `\r`
            // with a following `\n` would have written `\r\n`.
            end_kind in 0usize..3,
            comments in prop::collection::vec(any::<bool>(), 64),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            let eol = |_: usize| ["\n", "\r\n", "\r"][end_kind];
            let mut s = String::new();
            let mut k = 0;
            for lines in &events {
                if comments[k % comments.len()] {
                    s += ":keep-alive";
                    s += eol(k);
                    k += 1;
                }
                for l in lines {
                    s += "data: ";
                    s += l;
                    s += eol(k);
                    k += 1;
                }
                s += eol(k);
                k += 1;
            }
            let bytes = s.as_bytes();
            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            at.sort();
            let mut frames = vec![];
            let mut prev = 0;
            for a in at.into_iter().chain([bytes.len()]) {
                frames.push(&bytes[prev..a]);
                prev = a;
            }
            let (split, end) = all(&frames);
            let (whole, _) = all(&[bytes]);
            prop_assert_eq!(&split, &whole);
            prop_assert_eq!(end, Ok(()));
            let want: Vec<String> = events.iter().map(|lines| lines.join("\n")).collect();
            prop_assert_eq!(split.iter().map(|e| e.data.clone()).collect::<Vec<_>>(), want);
        }
    }
}
