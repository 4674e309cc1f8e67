package main

// demoShort is the demo command's summary, with the demo built in or not.
const demoShort = "Show the whole story in throw-away namespaces (needs root), then remove everything"
