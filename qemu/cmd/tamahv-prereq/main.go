// Command tamahv-prereq prints why the tamahv image cannot be built on this
// machine, or nothing when it can. make test uses it to say in one line
// that the image tests were skipped.
package main

import (
	"fmt"

	"github.com/tamahv/tamahv/qemu"
)

func main() {
	if why := qemu.ImagePrerequisites("go.mod"); why != "" {
		fmt.Println(why)
	}
}
