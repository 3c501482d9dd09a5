// Smoke test of the VisionDrop plugin libraries without TensorRT's libraries: only its headers.
// Load a library as TensorRT's loaders would, then drive the creators and plugins through the
// IPluginV3 interfaces (shapes with a stand-in IExprBuilder, types, formats, serialisation).
//
//   g++ -std=c++17 -rdynamic -I$TensorRT_ROOT/include -I/usr/local/cuda/include plugin_smoke.cpp -ldl -o smoke
//   ./smoke build/plugins_trt/libvisiondrop_trt_plugins.so                 # getCreators variant
//   LD_LIBRARY_PATH=<stub dir> ./smoke --static build/plugins_trt/libvisiondrop_trt_plugins_static.so
//
// --static: this executable exports getPluginRegistry / getLogger (-rdynamic), which take
// precedence over the libnvinfer stub the library was linked against, and hands out a recording
// registry: loading the library must register exactly the two creators under "visiondrop".

#include <NvInferRuntime.h>

#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <deque>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace {

int gFailures = 0;
#define CHECK(condition)                                                          \
    do {                                                                          \
        if (!(condition)) {                                                       \
            std::printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #condition);      \
            ++gFailures;                                                          \
        }                                                                         \
    } while (0)

struct CountingLogger : ILogger {
    int errors = 0;
    void log(Severity severity, AsciiChar const* message) noexcept override {
        if (severity <= Severity::kERROR) ++errors;
        std::printf("  [plugin log] %s\n", message);
    }
};

struct Finder : ILoggerFinder {
    CountingLogger logger;
    ILogger* findLogger() override { return &logger; }
};

// Stand-in for TensorRT's dimension expressions: every expression carries its value.
struct Expr : IDimensionExpr, apiv::VDimensionExpr {
    int64_t value;
    explicit Expr(int64_t v) : value(v) { mImpl = this; }
    bool isConstant() const override { return true; }
    int64_t getConstantValue() const override { return value; }
    bool isSizeTensor() const override { return false; }
};

struct Builder : IExprBuilder, apiv::VExprBuilder {
    std::deque<Expr> pool;
    Builder() { mImpl = this; }
    IDimensionExpr const* constant(int64_t v) override { return &pool.emplace_back(v); }
    IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& a, IDimensionExpr const& b) override {
        int64_t const x = a.getConstantValue(), y = b.getConstantValue();
        return constant(op == DimensionOperation::kSUB ? x - y : op == DimensionOperation::kSUM ? x + y : -1);
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override {
        return nullptr;
    }
};

DimsExprs dims(Builder& builder, std::vector<int64_t> const& values) {
    DimsExprs out{};
    out.nbDims = int32_t(values.size());
    for (size_t i = 0; i < values.size(); ++i) out.d[i] = builder.constant(values[i]);
    return out;
}

std::vector<int64_t> values(DimsExprs const& e) {
    std::vector<int64_t> out;
    for (int32_t i = 0; i < e.nbDims; ++i) out.push_back(e.d[i]->getConstantValue());
    return out;
}

DynamicPluginTensorDesc desc(DataType type, std::vector<int64_t> const& shape,
                             TensorFormat format = TensorFormat::kLINEAR) {
    DynamicPluginTensorDesc d{};
    d.desc.type = type;
    d.desc.format = format;
    d.desc.dims.nbDims = int32_t(shape.size());
    for (size_t i = 0; i < shape.size(); ++i) d.desc.dims.d[i] = d.min.d[i] = d.max.d[i] = d.opt.d[i] = shape[i];
    d.min.nbDims = d.max.nbDims = d.opt.nbDims = d.desc.dims.nbDims;
    return d;
}

IPluginV3* create(IPluginCreatorV3One* creator, char const* name, int32_t value) {
    PluginField field(name, &value, PluginFieldType::kINT32, 1);
    PluginFieldCollection fc{1, &field};
    return creator->createPlugin("smoke", &fc, TensorRTPhase::kBUILD);
}

void checkSelect(IPluginCreatorV3One* creator, Finder& finder) {
    IPluginV3* plugin = create(creator, "k", 168);
    CHECK(plugin != nullptr);
    if (!plugin) return;
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    CHECK(core && build && runtime);
    CHECK(std::string(core->getPluginName()) == "VisionDropSelect");
    CHECK(std::string(core->getPluginNamespace()) == "visiondrop");
    CHECK(build->getNbOutputs() == 5);

    DataType const in[3] = {DataType::kFLOAT, DataType::kHALF, DataType::kFLOAT};
    DataType out[5];
    CHECK(build->getOutputDataTypes(out, 5, in, 3) == 0);
    CHECK(out[0] == DataType::kHALF && out[1] == DataType::kHALF && out[2] == DataType::kFLOAT &&
          out[3] == DataType::kINT32 && out[4] == DataType::kINT32);

    Builder builder;
    DimsExprs inputs[3] = {dims(builder, {2, 576}), dims(builder, {2, 576, 4096}), dims(builder, {2, 576, 128})};
    DimsExprs shapes[5];
    CHECK(build->getOutputShapes(inputs, 3, nullptr, 0, shapes, 5, builder) == 0);
    CHECK((values(shapes[0]) == std::vector<int64_t>{2, 168, 4096}));
    CHECK((values(shapes[1]) == std::vector<int64_t>{2, 408, 4096}));
    CHECK((values(shapes[2]) == std::vector<int64_t>{2, 408, 128}));
    CHECK((values(shapes[3]) == std::vector<int64_t>{2, 168}));
    CHECK((values(shapes[4]) == std::vector<int64_t>{2, 408}));
    int const errors = finder.logger.errors;
    DimsExprs small[3] = {dims(builder, {1, 100}), dims(builder, {1, 100, 8}), dims(builder, {1, 100, 8})};
    CHECK(build->getOutputShapes(small, 3, nullptr, 0, shapes, 5, builder) != 0);  // N < k
    CHECK(finder.logger.errors == errors + 1);

    std::vector<DynamicPluginTensorDesc> io = {desc(DataType::kFLOAT, {2, 576}), desc(DataType::kBF16, {2, 576, 64}),
        desc(DataType::kFLOAT, {2, 576, 16}), desc(DataType::kBF16, {2, 168, 64}), desc(DataType::kBF16, {2, 408, 64}),
        desc(DataType::kFLOAT, {2, 408, 16}), desc(DataType::kINT32, {2, 168}), desc(DataType::kINT32, {2, 408})};
    for (int32_t pos = 0; pos < 8; ++pos) CHECK(build->supportsFormatCombination(pos, io.data(), 3, 5));
    io[3].desc.type = DataType::kHALF;  // dominant must match tokens
    CHECK(!build->supportsFormatCombination(3, io.data(), 3, 5));
    io[1].desc.type = DataType::kINT8;
    CHECK(!build->supportsFormatCombination(1, io.data(), 3, 5));
    io[0].desc.format = TensorFormat::kCHW32;
    CHECK(!build->supportsFormatCombination(0, io.data(), 3, 5));

    PluginFieldCollection const* fields = runtime->getFieldsToSerialize();
    CHECK(fields && fields->nbFields == 1 && std::string(fields->fields[0].name) == "k" &&
          fields->fields[0].type == PluginFieldType::kINT32 &&
          *static_cast<int32_t const*>(fields->fields[0].data) == 168);
    IPluginV3* restored = creator->createPlugin("restored", fields, TensorRTPhase::kRUNTIME);
    CHECK(restored != nullptr);
    IPluginV3* copy = restored ? restored->clone() : nullptr;
    CHECK(copy != nullptr);
    delete copy;
    delete restored;
    delete plugin;
}

void checkMerge(IPluginCreatorV3One* creator, Finder& finder) {
    IPluginV3* plugin = create(creator, "c", 24);
    CHECK(plugin != nullptr);
    if (!plugin) return;
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    CHECK(build && runtime);
    CHECK(build->getNbOutputs() == 2);
    DataType const in[2] = {DataType::kBF16, DataType::kFLOAT};
    DataType out[2];
    CHECK(build->getOutputDataTypes(out, 2, in, 2) == 0 && out[0] == DataType::kBF16 && out[1] == DataType::kINT32);

    Builder builder;
    DimsExprs inputs[2] = {dims(builder, {2, 408, 4096}), dims(builder, {2, 408, 128})};
    DimsExprs shapes[2];
    CHECK(build->getOutputShapes(inputs, 2, nullptr, 0, shapes, 2, builder) == 0);
    CHECK((values(shapes[0]) == std::vector<int64_t>{2, 24, 4096}));
    CHECK((values(shapes[1]) == std::vector<int64_t>{2, 384}));  // one target id per member: R - c
    int const shapeErrors = finder.logger.errors;
    DimsExprs small[2] = {dims(builder, {1, 10, 8}), dims(builder, {1, 10, 8})};
    CHECK(build->getOutputShapes(small, 2, nullptr, 0, shapes, 2, builder) != 0);  // R < c
    CHECK(finder.logger.errors == shapeErrors + 1);

    std::vector<DynamicPluginTensorDesc> io = {desc(DataType::kHALF, {2, 408, 4096}),
        desc(DataType::kFLOAT, {2, 408, 128}), desc(DataType::kHALF, {2, 24, 4096}), desc(DataType::kINT32, {2, 384})};
    for (int32_t pos = 0; pos < 4; ++pos) CHECK(build->supportsFormatCombination(pos, io.data(), 2, 2));
    CHECK(!build->supportsFormatCombination(4, io.data(), 2, 2));  // no fifth tensor
    io[3].desc.format = TensorFormat::kCHW32;  // the assignment is linear only
    CHECK(!build->supportsFormatCombination(3, io.data(), 2, 2));
    io[3].desc.format = TensorFormat::kLINEAR;
    io[3].desc.type = DataType::kFLOAT;  // and int32 only
    CHECK(!build->supportsFormatCombination(3, io.data(), 2, 2));
    io[2].desc.type = DataType::kFLOAT;
    CHECK(!build->supportsFormatCombination(2, io.data(), 2, 2));
    io[1].desc.type = DataType::kHALF;  // the metric stays fp32
    CHECK(!build->supportsFormatCombination(1, io.data(), 2, 2));
    CHECK(build->getWorkspaceSize(io.data(), 2, io.data() + 2, 2) >= size_t(2) * 408 * 4);

    PluginFieldCollection const* fields = runtime->getFieldsToSerialize();
    CHECK(fields && fields->nbFields == 1 && std::string(fields->fields[0].name) == "c" &&
          *static_cast<int32_t const*>(fields->fields[0].data) == 24);
    int const errors = finder.logger.errors;
    CHECK(create(creator, "c", 0) == nullptr);           // c >= 1
    CHECK(create(creator, "k", 3) == nullptr);           // wrong attribute name
    CHECK(finder.logger.errors == errors + 2);
    delete plugin;
}

// Records registerCreator calls; everything else is unused by the plugins and answers "nothing".
struct RecordingRegistry : IPluginRegistry {
    std::vector<IPluginCreatorInterface*> creators;
    std::vector<std::string> namespaces;
    bool registerCreator(IPluginCreatorInterface& creator, AsciiChar const* const ns) noexcept override {
        creators.push_back(&creator);
        namespaces.emplace_back(ns ? ns : "");
        return true;
    }
    IPluginCreatorInterface* const* getAllCreators(int32_t* const n) const noexcept override {
        *n = int32_t(creators.size());
        return creators.data();
    }
    IPluginCreatorInterface* getCreator(AsciiChar const* const, AsciiChar const* const, AsciiChar const* const) noexcept
        override {
        return nullptr;
    }
    bool deregisterCreator(IPluginCreatorInterface const&) noexcept override { return false; }
    void setErrorRecorder(IErrorRecorder* const) noexcept override {}
    IErrorRecorder* getErrorRecorder() const noexcept override { return nullptr; }
    bool isParentSearchEnabled() const override { return false; }
    void setParentSearchEnabled(bool const) override {}
    PluginLibraryHandle loadLibrary(AsciiChar const*) noexcept override { return nullptr; }
    void deregisterLibrary(PluginLibraryHandle) noexcept override {}
    IPluginResource* acquirePluginResource(AsciiChar const*, IPluginResource*) noexcept override { return nullptr; }
    int32_t releasePluginResource(AsciiChar const*) noexcept override { return 0; }
    // Pure virtual in some versions only (no `override`, so each compiles everywhere).
    IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const n) noexcept {
        *n = 0;
        return nullptr;
    }
#if NV_TENSORRT_MAJOR < 11  // the IPluginCreator (V1) overloads, removed in TensorRT 11
    bool registerCreator(IPluginCreator&, AsciiChar const* const) noexcept override { return false; }
    IPluginCreator* const* getPluginCreatorList(int32_t* const n) const noexcept override {
        *n = 0;
        return nullptr;
    }
    IPluginCreator* getPluginCreator(AsciiChar const* const, AsciiChar const* const, AsciiChar const* const) noexcept
        override {
        return nullptr;
    }
    bool deregisterCreator(IPluginCreator const&) noexcept override { return false; }
#endif
};

RecordingRegistry gRegistry;
Finder gFinder;
int gRegistryCalls = 0;

}  // namespace

// Interpose libnvinfer's entry points for the statically registering library.
extern "C" __attribute__((visibility("default"))) IPluginRegistry* getPluginRegistry() noexcept {
    ++gRegistryCalls;
    return &gRegistry;
}
extern "C" __attribute__((visibility("default"))) ILogger* getLogger() noexcept { return &gFinder.logger; }

int main(int argc, char** argv) {
    bool const staticMode = argc == 3 && std::string(argv[1]) == "--static";
    if (argc != 2 && !staticMode) {
        std::printf("usage: %s [--static] libvisiondrop_trt_plugins[_static].so\n", argv[0]);
        return 2;
    }
    char const* path = argv[argc - 1];
    void* library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!library) {
        std::printf("FAIL dlopen: %s\n", dlerror());
        return 1;
    }
    using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);
    using SetLoggerFinder = void (*)(ILoggerFinder*);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(library, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(library, "setLoggerFinder"));
    Finder& finder = gFinder;
    int32_t count = 0;
    IPluginCreatorInterface* const* creators = nullptr;
    if (staticMode) {
        // Registered while loading, under the plugins' namespace; no getCreators for loadLibrary to trip on.
        CHECK(!getCreators && !setLoggerFinder);
        CHECK(gRegistryCalls == 1);
        CHECK(gRegistry.creators.size() == 2);
        for (std::string const& ns : gRegistry.namespaces) CHECK(ns == "visiondrop");
        creators = gRegistry.getAllCreators(&count);
    } else {
        CHECK(getCreators && setLoggerFinder);
        if (!getCreators || !setLoggerFinder) return 1;
        CHECK(gRegistryCalls == 0);  // registers nothing by itself
        setLoggerFinder(&finder);
        creators = getCreators(count);
    }
    CHECK(count == 2);
    for (int32_t i = 0; i < count; ++i) {
        CHECK(std::string(creators[i]->getInterfaceInfo().kind) == "PLUGIN CREATOR_V3ONE");
        auto* creator = static_cast<IPluginCreatorV3One*>(creators[i]);
        std::string const name = creator->getPluginName();
        CHECK(std::string(creator->getPluginVersion()) == "1");
        CHECK(std::string(creator->getPluginNamespace()) == "visiondrop");
        PluginFieldCollection const* names = creator->getFieldNames();
        CHECK(names && names->nbFields == 1 && names->fields[0].type == PluginFieldType::kINT32);
        if (name == "VisionDropSelect")
            checkSelect(creator, finder);
        else if (name == "VisionDropMerge")
            checkMerge(creator, finder);
        else
            CHECK(!"unexpected creator name");
    }
    std::printf(gFailures ? "plugin smoke (%s): %d failure(s)\n" : "plugin smoke (%s) OK\n",
                staticMode ? "static registration" : "getCreators", gFailures);
    return gFailures ? 1 : 0;
}
