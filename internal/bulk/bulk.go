// Package bulk is a bulk-transfer protocol in the style of Tsunami and UDT:
// a TCP control connection, and the data over UDP on a port the server
// binds for the transfer from a range (the "auxiliary port" a perimeter
// must open a hole for), paced by a rate the sender adapts to the losses
// the receiver reports, with retransmission passes until every block has
// arrived and a SHA-256 over the whole at the end.
//
// It exists to test and measure procgate's pinholes with a program of our
// own that is a static Go binary (cmd/bulk, built with CGO_ENABLED=0): no
// libc, no LD_PRELOAD, which is what seed 003's agent could not see.
//
// The control connection carries JSON messages, one per line:
//
//	client → server  {"op":"get","name":N} or {"op":"put","name":N,"size":S,"sha256":H}
//	server → client  {"op":"port","port":P,"size":S,"sha256":H}   (H, S for get)
//	client → server  UDP "hello" datagrams to P until:
//	server → client  {"op":"ready"}
//	sender → receiver after each pass: {"op":"pass","pass":K}
//	receiver → sender {"op":"missing","ranges":[[A,B],...]} or {"op":"complete"}
//	server → client  {"op":"done","pass":K,"sent":D} or {"op":"error","error":E}
//	                 (K passes, D datagrams, when the server sent)
//
// A datagram is an 8-byte header, the block number (uint32 big endian)
// and the transfer's id (uint32), then the block.
package bulk

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// BlockSize is the data bytes in one datagram: with the 8-byte header,
// IP and UDP headers it fits a 1500-byte MTU.
const BlockSize = 1400

const headerSize = 8

// hello is the datagram a client sends to the data port until the server
// is ready: it shows the server the client's UDP address, and it is the
// first packet through the perimeter's hole.
var hello = []byte("bulk-hello")

// maxRanges bounds a "missing" message; the rest waits for the next pass.
const maxRanges = 4096

type message struct {
	Op     string      `json:"op"`
	Name   string      `json:"name,omitempty"`
	Size   int64       `json:"size,omitempty"`
	SHA256 string      `json:"sha256,omitempty"`
	Port   int         `json:"port,omitempty"`
	ID     uint32      `json:"id,omitempty"`
	Pass   int         `json:"pass,omitempty"`
	Sent   int64       `json:"sent,omitempty"`
	Ranges [][2]uint32 `json:"ranges,omitempty"`
	Error  string      `json:"error,omitempty"`
}

// conn is the control connection's codec.
type conn struct {
	enc *json.Encoder
	dec *json.Decoder
}

func (c conn) send(m message) error {
	if err := c.enc.Encode(m); err != nil {
		return fmt.Errorf("control: send %s: %w", m.Op, err)
	}
	return nil
}

// recv reads the next message and checks that it is one of ops; an
// "error" message becomes an error.
func (c conn) recv(ops ...string) (message, error) {
	var m message
	if err := c.dec.Decode(&m); err != nil {
		return m, fmt.Errorf("control: want %v: %w", ops, err)
	}
	if m.Op == "error" {
		return m, fmt.Errorf("peer: %s", m.Error)
	}
	for _, op := range ops {
		if m.Op == op {
			return m, nil
		}
	}
	return m, fmt.Errorf("control: got %q, want %v", m.Op, ops)
}

func blocks(size int64) uint32 {
	return uint32((size + BlockSize - 1) / BlockSize)
}

// maxSize keeps the block number in 32 bits.
const maxSize = int64(BlockSize) * (1<<32 - 1)

func checkSize(size int64) error {
	if size < 0 || size > maxSize {
		return fmt.Errorf("size %d: want 0 to %d bytes", size, maxSize)
	}
	return nil
}

func putHeader(b []byte, block, id uint32) {
	binary.BigEndian.PutUint32(b[0:4], block)
	binary.BigEndian.PutUint32(b[4:8], id)
}

func header(b []byte) (block, id uint32, err error) {
	if len(b) < headerSize {
		return 0, 0, errors.New("short datagram")
	}
	return binary.BigEndian.Uint32(b[0:4]), binary.BigEndian.Uint32(b[4:8]), nil
}

// Stats are what a transfer did.
type Stats struct {
	Bytes  int64
	SHA256 string
	Passes int
	// Sent counts the data datagrams the sender sent, retransmissions
	// included; Took is from the request to the end.
	Sent int64
	Took time.Duration
	// Port is the server's UDP data port.
	Port int
}
