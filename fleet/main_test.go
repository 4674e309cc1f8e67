package fleet

import (
	"os"
	"testing"

	"github.com/procgate/procgate/internal/etcdtest"
)

func TestMain(m *testing.M) {
	etcdtest.MaybeServe() // the members of etcdtest.StartCluster
	os.Exit(m.Run())
}
