package main

import "testing"

func TestPushNumber(t *testing.T) {
	tests := []struct {
		doc    string
		want   int
		wantOK bool
	}{
		{"apps: []\n# push 3\n", 3, true},
		{"# push 1\n# push 12\n", 12, true},
		{"", 0, false},
		{"apps", 0, false},
		{"apps: []\n", 0, false},
		{"# push x\n", 0, false},
		{"# push -1\n", 0, false},
	}
	for _, tt := range tests {
		n, ok := pushNumber([]byte(tt.doc))
		if ok != tt.wantOK || (ok && n != tt.want) {
			t.Errorf("pushNumber(%q) = %d, %v; want %d, %v", tt.doc, n, ok, tt.want, tt.wantOK)
		}
	}
}
