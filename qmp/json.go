package qmp

import (
	"github.com/migvisor/migvisor/qerr"
)

// The input side of QMP: a stream of JSON values with no framing, read the way QEMU's
// json-lexer/json-streamer/json-parser read it, so that every malformed input yields the same
// number of error replies with the same texts, and recovery skips the same bytes.
//
// Three stages, as in QEMU: a byte-driven lexer cuts tokens; the streamer collects a message's
// tokens until its brackets balance, enforcing the limits; the parser then builds the value from
// the collected tokens (errors are only reported once a message is complete).

const (
	maxTokenSize  = 64 << 20 // bytes of token text per message
	maxTokenCount = 2 << 20  // tokens per message
	maxNesting    = 1 << 10  // open brackets and braces
)

type tokType uint8

const (
	tokError    tokType = iota // lexical error: the bytes up to the offending one
	tokOversize                // a single token grew beyond maxTokenSize
	tokLCurly
	tokRCurly
	tokLSquare
	tokRSquare
	tokColon
	tokComma
	tokInteger
	tokFloat
	tokKeyword
	tokString
)

type lexState uint8

const (
	lsStart    lexState = iota
	lsRecovery          // after an error: skip to a likely resynchronisation point
	lsDQ                // in a "string"
	lsDQEscape
	lsSQ // in a 'string'
	lsSQEscape
	lsSign // after '-'
	lsZero
	lsDigits
	lsMantissa // after '.'
	lsMantissaDigits
	lsExpE    // after 'e'
	lsExpSign // after 'e+' / 'e-'
	lsExpDigits
	lsKeyword
)

type token struct {
	typ      tokType
	off, end uint32 // text is decoder.buf[off:end]; kept small, a message may hold 2Mi tokens
}

// decoder turns a byte stream into messages: each call of emit carries either a value or the
// error QEMU would report for that stretch of input.
type decoder struct {
	emit func(v *value, err *qerr.Error)

	state    lexState
	buf      []byte // texts of the collected tokens, then the token being lexed
	tokStart int    // where the token being lexed starts in buf
	toks     []token
	braces   int
	brackets int
	// doomed is set once the message's text cannot stay under maxTokenSize: the collected tokens
	// are dropped right away (they will never be parsed), so memory stays bounded by the limit.
	doomed bool
	// lenient accepts strings with invalid sequences, for JSON encoding/json wrote from Go
	// strings (which may hold non-characters QEMU would never accept as input).
	lenient bool
}

func newDecoder(emit func(v *value, err *qerr.Error)) *decoder {
	return &decoder{emit: emit}
}

// feed lexes b. emit may be called several times, and may block (the server uses that to stop
// reading while its request queue is full, as QEMU suspends its monitor).
func (d *decoder) feed(b []byte) {
	for _, c := range b {
		d.feedByte(c)
	}
}

func isWS(c byte) bool { return c == ' ' || c == '\t' || c == '\r' || c == '\n' }

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

// feedByte runs the lexer on one byte. A token that needs lookahead to end (numbers, keywords)
// is emitted and the byte is then looked at again from lsStart.
func (d *decoder) feedByte(c byte) {
	for {
		switch d.state {
		case lsStart:
			switch {
			case isWS(c):
			case c == '"':
				d.begin(c, lsDQ)
			case c == '\'':
				d.begin(c, lsSQ)
			case c == '-':
				d.begin(c, lsSign)
			case c == '0':
				d.begin(c, lsZero)
			case c >= '1' && c <= '9':
				d.begin(c, lsDigits)
			case c >= 'a' && c <= 'z':
				d.begin(c, lsKeyword)
			case c == '{':
				d.single(c, tokLCurly)
			case c == '}':
				d.single(c, tokRCurly)
			case c == '[':
				d.single(c, tokLSquare)
			case c == ']':
				d.single(c, tokRSquare)
			case c == ':':
				d.single(c, tokColon)
			case c == ',':
				d.single(c, tokComma)
			default:
				d.fail(c)
			}
		case lsRecovery:
			// Structural characters, control characters other than tab and the bytes that
			// never occur in UTF-8 end the skipping; they are then lexed normally.
			switch {
			case c == '[' || c == ']' || c == '{' || c == '}' || c == ':' || c == ',',
				c < 0x20 && c != '\t', c >= 0xFE:
				d.state = lsStart
				continue
			}
		case lsDQ, lsSQ:
			quote := byte('"')
			if d.state == lsSQ {
				quote = '\''
			}
			switch {
			case c < 0x20 || c >= 0xFE:
				d.fail(c)
			case c == '\\':
				d.push(c)
				d.state++ // lsDQEscape / lsSQEscape
			case c == quote:
				d.push(c)
				d.end(tokString)
			default:
				d.push(c)
			}
		case lsDQEscape, lsSQEscape:
			// Any printable byte; the parser judges the escape.
			if c < 0x20 || c >= 0xFE {
				d.fail(c)
			} else {
				d.push(c)
				d.state--
			}
		case lsSign:
			switch {
			case c == '0':
				d.push(c)
				d.state = lsZero
			case c >= '1' && c <= '9':
				d.push(c)
				d.state = lsDigits
			default:
				d.fail(c)
			}
		case lsZero:
			switch {
			case isDigit(c):
				d.fail(c)
			case c == '.':
				d.push(c)
				d.state = lsMantissa
			default:
				d.end(tokInteger)
				continue
			}
		case lsDigits:
			switch {
			case isDigit(c):
				d.push(c)
			case c == '.':
				d.push(c)
				d.state = lsMantissa
			case c == 'e' || c == 'E':
				d.push(c)
				d.state = lsExpE
			default:
				d.end(tokInteger)
				continue
			}
		case lsMantissa:
			if !isDigit(c) {
				d.fail(c)
			} else {
				d.push(c)
				d.state = lsMantissaDigits
			}
		case lsMantissaDigits:
			switch {
			case isDigit(c):
				d.push(c)
			case c == 'e' || c == 'E':
				d.push(c)
				d.state = lsExpE
			default:
				d.end(tokFloat)
				continue
			}
		case lsExpE:
			switch {
			case c == '+' || c == '-':
				d.push(c)
				d.state = lsExpSign
			case isDigit(c):
				d.push(c)
				d.state = lsExpDigits
			default:
				d.fail(c)
			}
		case lsExpSign:
			if !isDigit(c) {
				d.fail(c)
			} else {
				d.push(c)
				d.state = lsExpDigits
			}
		case lsExpDigits:
			if isDigit(c) {
				d.push(c)
			} else {
				d.end(tokFloat)
				continue
			}
		case lsKeyword:
			if c >= 'a' && c <= 'z' {
				d.push(c)
			} else {
				d.end(tokKeyword)
				continue
			}
		}
		break
	}
	// A single token may not grow without bound either; QEMU then restarts lexing afresh.
	if len(d.buf)-d.tokStart > maxTokenSize {
		d.end(tokOversize)
	}
}

func (d *decoder) begin(c byte, s lexState) {
	d.push(c)
	d.state = s
}

func (d *decoder) single(c byte, t tokType) {
	d.push(c)
	d.end(t)
}

// push appends a byte to the token being lexed.
func (d *decoder) push(c byte) {
	if !d.doomed && len(d.buf)+1+1 > maxTokenSize {
		// Whatever becomes of this token, the message now fails: keep only the token, whose
		// text a lexical error would quote.
		n := copy(d.buf, d.buf[d.tokStart:])
		d.buf = d.buf[:n]
		d.tokStart = 0
		d.toks = d.toks[:0]
		d.doomed = true
	}
	d.buf = append(d.buf, c)
}

// fail ends the token being lexed with a lexical error that includes c.
func (d *decoder) fail(c byte) {
	d.push(c)
	d.end(tokError)
	d.state = lsRecovery
}

// end hands the token being lexed to the streamer and goes back to lsStart.
func (d *decoder) end(t tokType) {
	d.state = lsStart
	tok := token{typ: t, off: uint32(d.tokStart), end: uint32(len(d.buf))}
	d.tokStart = len(d.buf)
	d.process(tok)
}

// process is the streamer: it counts brackets, enforces the limits and parses a message once
// its brackets balance (or a closing one has no partner).
func (d *decoder) process(t token) {
	switch t.typ {
	case tokLCurly:
		d.braces++
	case tokRCurly:
		d.braces--
	case tokLSquare:
		d.brackets++
	case tokRSquare:
		d.brackets--
	case tokError:
		d.done(nil, strayError(d.buf[t.off:t.end]))
		return
	}
	switch {
	case d.doomed:
		d.done(nil, qerr.Generic(errTokenSize))
		return
	case len(d.toks)+1 > maxTokenCount:
		d.done(nil, qerr.Generic(errTokenCount))
		return
	case d.braces+d.brackets > maxNesting:
		d.done(nil, qerr.Generic(errNesting))
		return
	}
	d.toks = append(d.toks, t)
	// QEMU only tests brackets for a negative count here, so "[}" keeps collecting.
	if (d.braces > 0 || d.brackets > 0) && d.brackets >= 0 {
		return
	}
	p := parser{d: d}
	v := p.value()
	if p.err != nil {
		v = nil
	}
	d.done(v, p.err)
}

// done resets the streamer and delivers a message.
func (d *decoder) done(v *value, err *qerr.Error) {
	d.braces, d.brackets = 0, 0
	d.doomed = false
	// A huge message should not pin its buffers for the rest of the connection.
	const keep = 64 << 10
	if cap(d.buf) > keep {
		d.buf = nil
	} else {
		d.buf = d.buf[:0]
	}
	if cap(d.toks) > keep {
		d.toks = nil
	} else {
		d.toks = d.toks[:0]
	}
	d.tokStart = 0
	d.emit(v, err)
}

// parser builds a value from a complete message's tokens. Only its first error counts.
type parser struct {
	d   *decoder
	pos int
	err *qerr.Error
}

func (p *parser) fail(format string, args ...any) {
	if p.err == nil {
		p.err = parseError(format, args...)
	}
}

func (p *parser) peek() *token {
	if p.pos >= len(p.d.toks) {
		return nil
	}
	return &p.d.toks[p.pos]
}

func (p *parser) pop() *token {
	t := p.peek()
	if t != nil {
		p.pos++
	}
	return t
}

func (p *parser) text(t *token) []byte { return p.d.buf[t.off:t.end] }

func (p *parser) value() *value {
	t := p.peek()
	if t == nil {
		p.fail(errPrematureEOI)
		return nil
	}
	switch t.typ {
	case tokLCurly:
		return p.object()
	case tokLSquare:
		return p.array()
	case tokInteger, tokFloat:
		p.pop()
		return &value{kind: kindNumber, float: t.typ == tokFloat, str: string(p.text(t))}
	case tokString:
		p.pop()
		s, err := decodeString(p.text(t), p.d.lenient)
		if err != nil {
			if p.err == nil {
				p.err = err
			}
			return nil
		}
		return &value{kind: kindString, str: s}
	case tokKeyword:
		p.pop()
		switch kw := string(p.text(t)); kw {
		case "true":
			return &value{kind: kindBool, b: true}
		case "false":
			return &value{kind: kindBool}
		case "null":
			return &value{kind: kindNull}
		default:
			p.fail(errInvalidKeyword, kw)
			return nil
		}
	default:
		p.fail(errExpectingValue)
		return nil
	}
}

func (p *parser) object() *value {
	p.pop() // '{'
	obj := &value{kind: kindObject}
	t := p.peek()
	if t == nil {
		p.fail(errPrematureEOI)
		return nil
	}
	if t.typ == tokRCurly {
		p.pop()
		return obj
	}
	for {
		if !p.pair(obj) {
			return nil
		}
		t = p.pop()
		if t == nil {
			p.fail(errPrematureEOI)
			return nil
		}
		if t.typ == tokRCurly {
			return obj
		}
		if t.typ != tokComma {
			p.fail(errSeparatorDict)
			return nil
		}
	}
}

func (p *parser) pair(obj *value) bool {
	if p.peek() == nil {
		p.fail(errPrematureEOI)
		return false
	}
	key := p.value()
	if key == nil || key.kind != kindString {
		p.fail(errKeyNotString)
		return false
	}
	t := p.pop()
	if t == nil {
		p.fail(errPrematureEOI)
		return false
	}
	if t.typ != tokColon {
		p.fail(errMissingColon)
		return false
	}
	v := p.value()
	if v == nil {
		return false
	}
	if obj.has(key.str) {
		p.fail(errDuplicateKey)
		return false
	}
	obj.add(key.str, v)
	return true
}

func (p *parser) array() *value {
	p.pop() // '['
	arr := &value{kind: kindArray}
	t := p.peek()
	if t == nil {
		p.fail(errPrematureEOI)
		return nil
	}
	if t.typ == tokRSquare {
		p.pop()
		return arr
	}
	for {
		v := p.value()
		if v == nil {
			return nil
		}
		arr.append(v)
		t = p.pop()
		if t == nil {
			p.fail(errPrematureEOI)
			return nil
		}
		if t.typ == tokRSquare {
			return arr
		}
		if t.typ != tokComma {
			p.fail(errSeparatorList)
			return nil
		}
	}
}

// decodeString decodes a string token (quotes included) the way QEMU does: the usual escapes plus
// \', surrogate pairs, and no invalid or non-character code points. lenient turns invalid raw
// sequences into U+FFFD instead, as QEMU's writer prints them.
func decodeString(tok []byte, lenient bool) (string, *qerr.Error) {
	quote := tok[0]
	out := make([]byte, 0, len(tok))
	at := func(i int) byte { // QEMU's token is NUL-terminated; reading past it sees 0
		if i < len(tok) {
			return tok[i]
		}
		return 0
	}
	for i := 1; tok[i] != quote; {
		c := tok[i]
		if c != '\\' {
			cp, next := decodeModUTF8(tok, i)
			if cp < 0 && lenient {
				cp = 0xFFFD
			}
			if cp < 0 {
				return "", parseError(errInvalidUTF8)
			}
			out = appendRune(out, cp)
			i = next
			continue
		}
		beg := i
		esc := at(i + 1)
		i += 2
		switch esc {
		case '"', '\'', '\\', '/':
			out = append(out, esc)
		case 'b':
			out = append(out, '\b')
		case 'f':
			out = append(out, '\f')
		case 'n':
			out = append(out, '\n')
		case 'r':
			out = append(out, '\r')
		case 't':
			out = append(out, '\t')
		case 'u':
			cp := hex4(tok, i)
			i += 4
			if cp >= 0xD800 && cp <= 0xDBFF && at(i) == '\\' && at(i+1) == 'u' {
				lo := hex4(tok, i+2)
				if lo >= 0xDC00 && lo <= 0xDFFF {
					cp = 0x10000 + (cp&0x3FF)<<10 | lo&0x3FF
					i += 6
				} else {
					cp = -1
				}
			}
			if !validCodepoint(cp) {
				return "", parseError(errInvalidCodepoint, tok[beg:min(i, len(tok))])
			}
			out = appendRune(out, cp)
		default:
			return "", parseError(errInvalidEscape)
		}
	}
	return string(out), nil
}

// hex4 reads four hex digits at b[i:], or returns -1.
func hex4(b []byte, i int) int {
	cp := 0
	for j := i; j < i+4; j++ {
		if j >= len(b) {
			return -1
		}
		c := b[j]
		switch {
		case c >= '0' && c <= '9':
			cp = cp<<4 | int(c-'0')
		case c >= 'a' && c <= 'f':
			cp = cp<<4 | int(c-'a'+10)
		case c >= 'A' && c <= 'F':
			cp = cp<<4 | int(c-'A'+10)
		default:
			return -1
		}
	}
	return cp
}

// validCodepoint rejects what QEMU rejects: out of range, surrogates and the 66 non-characters.
func validCodepoint(cp int) bool {
	switch {
	case cp < 0 || cp > 0x10FFFF:
		return false
	case cp >= 0xFDD0 && cp <= 0xFDEF, cp&0xFFFE == 0xFFFE:
		return false
	case cp >= 0xD800 && cp <= 0xDFFF:
		return false
	}
	return true
}

// decodeModUTF8 decodes the sequence at s[i:] as QEMU's modified UTF-8 (where U+0000 may be
// written C0 80): it returns the code point, or -1 for an invalid sequence, and where the next
// sequence starts (past the continuation bytes seen, as QEMU resynchronises).
func decodeModUTF8[S []byte | string](s S, i int) (int, int) {
	c := s[i]
	switch {
	case c < 0x80:
		return int(c), i + 1
	case c >= 0xFE, c&0x40 == 0: // impossible byte, or a stray continuation byte
		return -1, i + 1
	}
	n := 0
	for mask := byte(0x80); c&mask != 0; mask >>= 1 {
		n++
	}
	cp := int(c) & (0x7F >> n)
	j := i + 1
	for k := 1; k < n; k++ {
		if j >= len(s) || s[j]&0xC0 != 0x80 {
			return -1, j
		}
		cp = cp<<6 | int(s[j]&0x3F)
		j++
	}
	minCP := [...]int{0x80, 0x800, 0x10000, 0x200000, 0x4000000}[n-2]
	if !validCodepoint(cp) || (cp < minCP && !(cp == 0 && n == 2)) {
		return -1, j
	}
	return cp, j
}

func appendRune(b []byte, cp int) []byte {
	if cp == 0 {
		return append(b, 0)
	}
	switch {
	case cp < 0x80:
		return append(b, byte(cp))
	case cp < 0x800:
		return append(b, 0xC0|byte(cp>>6), 0x80|byte(cp&0x3F))
	case cp < 0x10000:
		return append(b, 0xE0|byte(cp>>12), 0x80|byte(cp>>6&0x3F), 0x80|byte(cp&0x3F))
	default:
		return append(b, 0xF0|byte(cp>>18), 0x80|byte(cp>>12&0x3F), 0x80|byte(cp>>6&0x3F), 0x80|byte(cp&0x3F))
	}
}
