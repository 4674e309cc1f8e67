package perimeter

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/procgate/procgate/internal/nstest"
)

// benchKeys makes n distinct holes into 10.9.0.0/16 from 198.18.0.0/15.
func benchKeys(n, offset int) []Key {
	keys := make([]Key, n)
	for i := range keys {
		j := i + offset
		keys[i] = Key{
			Peer:  netip.AddrFrom4([4]byte{198, 18 + byte(j>>24&1), byte(j >> 16), byte(j >> 8)}),
			Proto: TCP,
			Host:  netip.AddrFrom4([4]byte{10, 9, byte(j), 1}),
			Port:  uint16(1024 + j%60000),
		}
	}
	return keys
}

// BenchmarkUpdate measures hole updates per second through batched netlink
// transactions (seed 003's Fig. 8 and 9: iptables reached 10,000/s at its
// best batch size). Each operation is one transaction of `batch` updates,
// alternately opening and closing the same holes, with `existing` other
// holes in the set.
func BenchmarkUpdate(b *testing.B) {
	nstest.RequireRoot(b)
	for _, existing := range []int{0, 100_000} {
		for _, batch := range []int{1, 10, 100, 1000, 10_000} {
			b.Run(fmt.Sprintf("existing=%d/batch=%d", existing, batch), func(b *testing.B) {
				tab := openTestTable(b, nstest.NetNS(b))
				var base []Element
				for _, k := range benchKeys(existing, 1<<20) {
					base = append(base, Element{Key: k, Timeout: time.Hour, Comment: comment("bench", "bench")})
				}
				if err := tab.Update(base, nil); err != nil {
					b.Fatal(err)
				}
				keys := benchKeys(batch, 0)
				add := make([]Element, len(keys))
				for i, k := range keys {
					add[i] = Element{Key: k, Timeout: time.Hour, Comment: comment("bench", "bench")}
				}
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					var err error
					if i%2 == 0 {
						err = tab.Update(add, nil)
					} else {
						err = tab.Update(nil, keys)
					}
					if err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(b.N*batch)/b.Elapsed().Seconds(), "updates/s")
			})
		}
	}
}
