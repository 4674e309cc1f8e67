//go:build procgate_demo

package main

import "github.com/procgate/procgate/demo"

func init() { runDemo = demo.Run }
