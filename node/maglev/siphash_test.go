package maglev

import (
	"fmt"
	"testing"
)

// TestSipHash24ReferenceVectors checks against the vectors of the SipHash reference
// implementation (vectors_sip64: key 00 01 .. 0f, message 00 01 .. n-1); n=15 is the worked
// example of the paper's appendix A. They cover the empty message, every tail length and a
// message of more than one word.
func TestSipHash24ReferenceVectors(t *testing.T) {
	want := map[int]uint64{
		0:  0x726fdb47dd0e0e31,
		1:  0x74f839c593dc67fd,
		2:  0x0d6c8009d9a94f5a,
		3:  0x85676696d7fb7e2d,
		4:  0xcf2794e0277187b7,
		5:  0x18765564cd99a68d,
		6:  0xcbc9466e58fee3ce,
		7:  0xab0200f58b01d137,
		8:  0x93f5f5799a932462,
		9:  0x9e0082df0ba9e4b0,
		15: 0xa129ca6149be45e5,
		16: 0x3f2acc7f57c29bdb,
	}
	const k0, k1 = 0x0706050403020100, 0x0f0e0d0c0b0a0908
	msg := make([]byte, 16)
	for i := range msg {
		msg[i] = byte(i)
	}
	for n, w := range want {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			if got := sipHash24(k0, k1, msg[:n]); got != w {
				t.Errorf("sipHash24(reference key, %d bytes) = %#016x, want %#016x", n, got, w)
			}
		})
	}
}

// TestSeedKey pins how a seed becomes the SipHash key: bytes 0-7 and 8-11, little-endian.
func TestSeedKey(t *testing.T) {
	s := Seed{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}
	k0, k1 := s.key()
	if k0 != 0x0706050403020100 || k1 != 0x0b0a0908 {
		t.Errorf("key() = %#x, %#x, want 0x0706050403020100, 0xb0a0908", k0, k1)
	}
}
