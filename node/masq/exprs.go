package masq

import (
	"encoding/binary"
	"fmt"
	"reflect"
	"strings"

	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Registers as nft uses them for these matches (NFT_REG_1, NFT_REG_2).
const (
	reg1 = unix.NFT_REG_1
	reg2 = unix.NFT_REG_2
)

// addrOffsets are the source and destination address offsets in the network
// header of family f, and the address length.
func addrOffsets(f Family) (saddr, daddr, length uint32) {
	if f == IPv4 {
		return 12, 16, 4
	}
	return 8, 24, 16
}

// ruleExprs translates r into the expressions nft itself would generate for
// it. setID gives the batch ID of a set created in the same batch.
func ruleExprs(f Family, r Rule, setID func(name string) uint32) ([]expr.Any, error) {
	if r.Unrecognized != "" {
		return nil, fmt.Errorf("rule %q is not one this package writes", r.Unrecognized)
	}
	if (r.Jump == "") == (r.Masquerade == nil) {
		return nil, fmt.Errorf("rule %q: needs exactly one of Jump and Masquerade", r.text(f))
	}
	if r.SourcePortMin != 0 && r.L4Proto == 0 {
		return nil, fmt.Errorf("rule %q: SourcePortMin needs L4Proto", r.text(f))
	}
	saddr, daddr, alen := addrOffsets(f)
	var es []expr.Any
	if r.SourceInSet != "" {
		es = append(es,
			&expr.Payload{DestRegister: reg1, Base: expr.PayloadBaseNetworkHeader, Offset: saddr, Len: alen},
			&expr.Lookup{SourceRegister: reg1, SetName: r.SourceInSet, SetID: setID(r.SourceInSet)})
	}
	if r.DestNotInSet != "" {
		es = append(es,
			&expr.Payload{DestRegister: reg1, Base: expr.PayloadBaseNetworkHeader, Offset: daddr, Len: alen},
			&expr.Lookup{SourceRegister: reg1, SetName: r.DestNotInSet, SetID: setID(r.DestNotInSet), Invert: true})
	}
	if r.L4Proto != 0 {
		es = append(es,
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: reg1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: reg1, Data: []byte{r.L4Proto}})
	}
	if r.SourcePortMin != 0 {
		es = append(es,
			&expr.Payload{DestRegister: reg1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 2},
			&expr.Cmp{Op: expr.CmpOpGte, Register: reg1, Data: be16(r.SourcePortMin)})
	}
	if r.Jump != "" {
		es = append(es, &expr.Verdict{Kind: expr.VerdictJump, Chain: r.Jump})
	}
	if m := r.Masquerade; m != nil {
		if m.Ports.IsZero() {
			es = append(es, &expr.Masq{FullyRandom: m.FullyRandom})
		} else {
			if r.L4Proto == 0 {
				return nil, fmt.Errorf("rule %q: a masquerade port range needs L4Proto", r.text(f))
			}
			es = append(es,
				&expr.Immediate{Register: reg1, Data: be16(m.Ports.First)},
				&expr.Immediate{Register: reg2, Data: be16(m.Ports.Last)},
				&expr.Masq{FullyRandom: m.FullyRandom, ToPorts: true, RegProtoMin: reg1, RegProtoMax: reg2})
		}
	}
	return es, nil
}

// parseRule is the inverse of ruleExprs. It also accepts what nft -f makes of
// Rule.text. ok is false for anything else.
func parseRule(f Family, es []expr.Any) (r Rule, ok bool) {
	saddr, daddr, alen := addrOffsets(f)
	// Matches come in pairs (load, compare); the action ends the rule.
	for i := 0; i < len(es); i++ {
		last := i == len(es)-1
		var next expr.Any
		if !last {
			next = es[i+1]
		}
		switch e := es[i].(type) {
		case *expr.Payload:
			if e.OperationType != expr.PayloadLoad || e.DestRegister == 0 || last {
				return Rule{}, false
			}
			switch {
			case e.Base == expr.PayloadBaseNetworkHeader && e.Len == alen && e.Offset == saddr:
				l, isLookup := next.(*expr.Lookup)
				if !isLookup || !plainLookup(l, e.DestRegister) || l.Invert || r.SourceInSet != "" {
					return Rule{}, false
				}
				r.SourceInSet = l.SetName
			case e.Base == expr.PayloadBaseNetworkHeader && e.Len == alen && e.Offset == daddr:
				l, isLookup := next.(*expr.Lookup)
				if !isLookup || !plainLookup(l, e.DestRegister) || !l.Invert || r.DestNotInSet != "" {
					return Rule{}, false
				}
				r.DestNotInSet = l.SetName
			case e.Base == expr.PayloadBaseTransportHeader && e.Offset == 0 && e.Len == 2:
				c, isCmp := next.(*expr.Cmp)
				if !isCmp || c.Op != expr.CmpOpGte || c.Register != e.DestRegister || len(c.Data) != 2 ||
					r.L4Proto == 0 || r.SourcePortMin != 0 {
					return Rule{}, false
				}
				r.SourcePortMin = binary.BigEndian.Uint16(c.Data)
				if r.SourcePortMin == 0 {
					return Rule{}, false
				}
			default:
				return Rule{}, false
			}
			i++
		case *expr.Meta:
			c, isCmp := next.(*expr.Cmp)
			if e.Key != expr.MetaKeyL4PROTO || e.SourceRegister || !isCmp || c.Op != expr.CmpOpEq ||
				c.Register != e.Register || len(c.Data) != 1 || c.Data[0] == 0 || r.L4Proto != 0 {
				return Rule{}, false
			}
			r.L4Proto = c.Data[0]
			i++
		case *expr.Verdict:
			if e.Kind != expr.VerdictJump || e.Chain == "" || !last {
				return Rule{}, false
			}
			r.Jump = e.Chain
		case *expr.Masq:
			if e.ToPorts || e.Random || e.Persistent || !last {
				return Rule{}, false
			}
			r.Masquerade = &Masquerade{FullyRandom: e.FullyRandom}
		case *expr.Immediate:
			// immediate min; immediate max; masq with the two registers.
			if i+2 != len(es)-1 || r.L4Proto == 0 {
				return Rule{}, false
			}
			hi, hiOK := es[i+1].(*expr.Immediate)
			m, mOK := es[i+2].(*expr.Masq)
			if !hiOK || !mOK || len(e.Data) != 2 || len(hi.Data) != 2 || e.Register == hi.Register ||
				!m.ToPorts || m.Random || m.Persistent || m.RegProtoMin != e.Register || m.RegProtoMax != hi.Register {
				return Rule{}, false
			}
			ports := PortRange{binary.BigEndian.Uint16(e.Data), binary.BigEndian.Uint16(hi.Data)}
			if ports.First == 0 || ports.First > ports.Last {
				return Rule{}, false
			}
			r.Masquerade = &Masquerade{Ports: ports, FullyRandom: m.FullyRandom}
			i += 2
		default:
			return Rule{}, false
		}
	}
	if (r.Jump == "") == (r.Masquerade == nil) {
		return Rule{}, false
	}
	return r, true
}

func plainLookup(l *expr.Lookup, reg uint32) bool {
	return l.SourceRegister == reg && !l.IsDestRegSet && l.SetName != ""
}

// describeExprs renders expressions for Rule.Unrecognized.
func describeExprs(es []expr.Any) string {
	parts := make([]string, len(es))
	for i, e := range es {
		parts[i] = strings.TrimPrefix(fmt.Sprintf("%T%+v", e, reflect.Indirect(reflect.ValueOf(e))), "*expr.")
	}
	return strings.Join(parts, " ")
}

func be16(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }
