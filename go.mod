module github.com/tamahv/tamahv

go 1.26.0

require (
	github.com/stretchr/testify v1.12.1
	golang.org/x/arch v0.33.0
)

require (
	github.com/usbarmory/tamago v1.26.0 // indirect
	go.yaml.in/yaml/v3 v3.0.5 // indirect
)

tool github.com/usbarmory/tamago/cmd/tamago
