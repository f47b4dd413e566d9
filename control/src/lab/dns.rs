//! Just enough DNS for the lab to put a UDP Service through a real
//! request/response protocol: pods answer a query for any name with one
//! TXT record holding their own name (as `whoami` services do), and
//! `ocelot lab connect --dns` asks and reads that record back.

/// TXT, class IN.
const TYPE_TXT: u16 = 16;
const CLASS_IN: u16 = 1;
const HEADER: usize = 12;

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// The end of the (uncompressed) name starting at `at`.
fn skip_name(b: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *b.get(at)? as usize;
        match len {
            0 => return Some(at + 1),
            l if l & 0xc0 == 0xc0 => return Some(at + 2),
            l if l < 64 => at += 1 + l,
            _ => return None,
        }
    }
}

/// A query for `name`, type TXT, with id `id`.
pub fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(HEADER + name.len() + 6);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.').filter(|l| !l.is_empty()) {
        let l = &label.as_bytes()[..label.len().min(63)];
        q.push(l.len() as u8);
        q.extend_from_slice(l);
    }
    q.push(0);
    q.extend_from_slice(&TYPE_TXT.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    q
}

/// If `req` is a standard query with one question, the answer: the
/// question echoed and one TXT record holding `text`.
pub fn answer(req: &[u8], text: &str) -> Option<Vec<u8>> {
    let flags = be16(req, 2)?;
    if flags & 0x8000 != 0 || (flags >> 11) & 0xf != 0 || be16(req, 4)? != 1 {
        return None;
    }
    let qend = skip_name(req, HEADER)? + 4;
    if qend > req.len() {
        return None;
    }
    let text = &text.as_bytes()[..text.len().min(255)];
    let mut r = Vec::with_capacity(qend + 12 + text.len() + 1);
    r.extend_from_slice(&req[..2]);
    r.extend_from_slice(&(0x8400 | (flags & 0x0100)).to_be_bytes()); // QR AA, RD echoed
    r.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 0]);
    r.extend_from_slice(&req[HEADER..qend]);
    r.extend_from_slice(&[0xc0, HEADER as u8]); // the question's name
    r.extend_from_slice(&TYPE_TXT.to_be_bytes());
    r.extend_from_slice(&CLASS_IN.to_be_bytes());
    r.extend_from_slice(&0u32.to_be_bytes()); // TTL
    r.extend_from_slice(&((text.len() + 1) as u16).to_be_bytes());
    r.push(text.len() as u8);
    r.extend_from_slice(text);
    Some(r)
}

/// The first TXT string of the answer to query `id`, or why there is none.
pub fn read_answer(resp: &[u8], id: u16) -> Result<String, String> {
    let short = || "truncated DNS answer".to_string();
    if be16(resp, 0).ok_or_else(short)? != id {
        return Err("DNS answer to another query".into());
    }
    let flags = be16(resp, 2).ok_or_else(short)?;
    if flags & 0x8000 == 0 {
        return Err("not a DNS answer".into());
    }
    if flags & 0xf != 0 {
        return Err(format!("DNS error code {}", flags & 0xf));
    }
    let (qd, an) = (be16(resp, 4).ok_or_else(short)?, be16(resp, 6).ok_or_else(short)?);
    if an == 0 {
        return Err("DNS answer without records".into());
    }
    let mut at = HEADER;
    for _ in 0..qd {
        at = skip_name(resp, at).ok_or_else(short)? + 4;
    }
    at = skip_name(resp, at).ok_or_else(short)?;
    let ty = be16(resp, at).ok_or_else(short)?;
    let rdlen = be16(resp, at + 8).ok_or_else(short)? as usize;
    let rdata = resp.get(at + 10..at + 10 + rdlen).ok_or_else(short)?;
    if ty != TYPE_TXT {
        return Err(format!("DNS record of type {ty}, not TXT"));
    }
    let n = *rdata.first().ok_or_else(short)? as usize;
    let s = rdata.get(1..1 + n).ok_or_else(short)?;
    Ok(String::from_utf8_lossy(s).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_answer_round_trip() {
        let q = query(0x1234, "whoami.lab.");
        let a = answer(&q, "x/a").expect("a query");
        assert_eq!(read_answer(&a, 0x1234), Ok("x/a".into()));
        assert!(read_answer(&a, 0x9999).is_err());
        // Not queries: the lab's probes, answers, truncated bytes.
        assert!(answer(b"probe\n", "x/a").is_none());
        assert!(answer(&a, "x/a").is_none());
        for cut in 0..q.len() {
            assert!(answer(&q[..cut], "x/a").is_none(), "{cut}");
        }
        for cut in 0..a.len() {
            assert!(read_answer(&a[..cut], 0x1234).is_err(), "{cut}");
        }
    }
}
