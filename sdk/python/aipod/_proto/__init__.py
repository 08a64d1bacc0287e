"""Protocol types generated from proto/ai.proto when the package is built."""
