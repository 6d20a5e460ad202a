// Command tamahv-preflight says whether this machine can run tamahv: an
// Intel processor with VMX, EPT and unrestricted guest, Secure Boot off,
// tamahv's region in RAM, and which firmware booted it. It exits 1 when a
// check fails. make install runs it first.
package main

import (
	"fmt"
	"os"

	"github.com/tamahv/tamahv/install"
)

func main() {
	cs := install.Preflight(os.DirFS("/"))
	for _, c := range cs {
		fmt.Println(c)
	}
	if install.Failed(cs) {
		fmt.Println("preflight: this machine cannot run tamahv as it is")
		os.Exit(1)
	}
	fmt.Println("preflight: nothing stands in the way")
}
