#!/usr/bin/env node
// Compile contracts/*.sol with the pinned solcjs (standard JSON, optimizer on) into
// ../secure_ci/ledger/artifacts/<Name>.json: abi, bytecode, deployed bytecode, compiler
// version, settings and the SHA-256 of every source. Usage: node scripts/build.mjs [OUT_DIR]
import { createHash } from 'node:crypto'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { createRequire } from 'node:module'
import { fileURLToPath } from 'node:url'

const require = createRequire(import.meta.url)
const solc = require('solc')
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..')
const outDir = path.resolve(process.argv[2] ?? path.join(root, '..', 'secure_ci', 'ledger', 'artifacts'))
const CONTRACTS = ['SecureCILedger']

const settings = {
  optimizer: { enabled: true, runs: 200 },
  evmVersion: 'cancun',
  viaIR: true,
  outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object'] } },
}

const sha256 = (text) => createHash('sha256').update(text).digest('hex')

const sources = {}
for (const name of CONTRACTS) {
  const key = `contracts/${name}.sol`
  sources[key] = { content: fs.readFileSync(path.join(root, key), 'utf8') }
}

const read = {}
function findImports(importPath) {
  const candidates = [path.join(root, 'node_modules', importPath), path.join(root, importPath)]
  for (const candidate of candidates) {
    if (fs.existsSync(candidate)) {
      const content = fs.readFileSync(candidate, 'utf8')
      read[importPath] = sha256(content)
      return { contents: content }
    }
  }
  return { error: `not found: ${importPath}` }
}

const input = { language: 'Solidity', sources, settings }
const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }))
const errors = (output.errors ?? []).filter((e) => e.severity === 'error')
for (const e of output.errors ?? []) console.error(e.formattedMessage)
if (errors.length > 0) process.exit(1)

fs.mkdirSync(outDir, { recursive: true })
for (const name of CONTRACTS) {
  const key = `contracts/${name}.sol`
  const compiled = output.contracts[key][name]
  const sourceHashes = { [key]: sha256(sources[key].content), ...read }
  const artifact = {
    contractName: name,
    solcVersion: solc.version(),
    settings: { optimizer: settings.optimizer, evmVersion: settings.evmVersion, viaIR: settings.viaIR },
    sourceHash: sourceHashes[key],
    sources: Object.fromEntries(Object.entries(sourceHashes).sort()),
    abi: compiled.abi,
    bytecode: '0x' + compiled.evm.bytecode.object,
    deployedBytecode: '0x' + compiled.evm.deployedBytecode.object,
  }
  const file = path.join(outDir, `${name}.json`)
  fs.writeFileSync(file, JSON.stringify(artifact, null, 2) + '\n')
  console.log(`${file}: ${compiled.evm.deployedBytecode.object.length / 2} bytes deployed`)
}
